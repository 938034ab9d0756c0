set -o pipefail
B=build/gemv_exp/gemv_exp
V="ring16s6r,ring16s6r/pro=1,ring16s6r/pro=2,ring16s6r/pro=3,ring16s6r/pro=6,ring16s6r/pdl=0,ring16s6r/pdl=0/pro=2,ring16s6r"
( $B 14336 4096 1 $V
  $B 14336 4096 8 ring16s6ra,ring16s6ra/pro=1,ring16s6ra/pro=2,ring16s6ra/pro=3,ring16s6ra/pro=6
  $B 4096 14336 1 $V
  $B 4096 4096 1 ring8s6r2,ring8s6r2/pro=1,ring8s6r2/pro=2,ring8s6r2/pro=3,ring8s6r2/pro=6
  $B 4096 4096 8 ring8s6r2,ring8s6r2/pro=2,ring8s6r2/pro=6
  $B 32768 16384 1 ring16s6ra,ring16s6ra/pro=2,ring16s6ra/pro=6 ) 2>&1 | tee $OUT/exp6.txt
