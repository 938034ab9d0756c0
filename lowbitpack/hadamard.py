"""Fast unnormalised Walsh–Hadamard transform (WHT) in pure torch, for sizes m·2^p with a known block m.

The matrix is M_n = H_m ⊗ H_{2^p}: H_{2^p} the Sylvester Hadamard matrix in natural order
(H[j, j'] = (-1)^popcount(j & j')) and H_m one of the known Hadamard matrices of size
12, 20, 28, 36, 40, 52, 60, 108, 140, 156 or 172 (m = 1 for powers of two). This is the matrix the QWHA
reference code (and QuaRot / QuIP#'s `matmul_hadU`, whose tables it uses) applies: the block is chosen by
testing n % m == 0 in the order 172, 156, 140, 108, 60, 52, 36, 28, 40, 20, 12, and n / m must be a power
of two. The order matters: 80 = 40·2 uses the 40-block, never 20 ⊗ H_4, because H_40 (= H_2 ⊗ H_20 here)
and H_20 ⊗ H_2 order their rows differently.

`wht(x)` applies M to every row vector along the last dim, i.e. returns x @ Mᵀ; `wht(x, transpose=True)`
returns x @ M. M·Mᵀ = n·I. Only the power-of-two factor is symmetric: the known blocks are not (except 28
and 36), so the two differ for m > 1. The transform is a mixed-radix butterfly: one stage per Kronecker
factor (H_m, then Sylvester blocks of ≤ 64 points), each a small matmul along one axis; cost per row
n·(m + Σ radices) multiply-adds (n·log-ish), and no n×n matrix is ever formed.

The known blocks are the tables of Sloane's Hadamard library as shipped by QuaRot and the QWHA reference
(`get_had12` … `get_had172`), stored here bit-packed (row-major, 1 = +1, MSB first) with the sha256 of each
table as int8 bytes; tests check H·Hᵀ = m·I and the hashes.
"""
from __future__ import annotations

import base64
import functools

import torch

# The reference's search order (see module docstring): first m with n % m == 0 wins.
KNOWN_SIZES: tuple[int, ...] = (172, 156, 140, 108, 60, 52, 36, 28, 40, 20, 12)

_TABLES_B64: dict[int, str] = {
    12: (
        "gA0d6OtH2j7R9ou0najtx2o7"
    ),
    20: (
        "gAANhXnsK8thXpsK/NhX5sK/NhX5sKvNhd5sKvNh15sKvNiV5sivNoV5vCvN4V5rCvM="
    ),
    28: (
        "//3//sNrDfYbWGuw6sPdh1Ye7Dqwt2LVibsmrI3aNWhu4avDdw1eG7hqsN7DXYb2Gn/8AArDRPLWGCeasNE81YSJ7qwET7VhInmr"
        "GRONWciYat5Ew1TyLhqHkbDVPI2GieQ="
    ),
    36: (
        "///f//9GLtGL+jF2jF/Ri7Rivoxtox30Y20Yr6MraMl9GltGi+ji2jxfRxbR4vo4tosX0sW0mL6mLajF9jFtxi+xi2oxfoxb0Yv0"
        "Yt6MX6MWf//AAAtGLC502jFBc67RiAudtoxQXO20YILnraMUFzltGaC5i2jdBcxbROgu4toHQXsW0ToLmLaZ0FjFtc6Cxi2OdBox"
        "bXOg0YtLnQ6MWFzo"
    ),
    40: (
        "gAAIAADYV52FeewrzsK8thXrYV6bCvmwr82FfNhX5sK+bCvzYV82Ffmwr5sKvNhbzYXebC3mwq82GvNh15sNebCrzYq82JXmyV5s"
        "ivNorzaFebhXm8K83CvN4V5uFeawrzsK84AAB///2FeSeobsK8E9Q7YV5J6hmwr2T1DNhXMnqObCsZPU82FQyer5sKBk9bzYVDJ6"
        "3mwiGT2vNhUMntebAoZPq82FQyeV5sahk4rzZ1DJhXm3qGTCvNPUMuFeYeoZsK809Qw="
    ),
    52: (
        "p5R+NMsJBTyj86ZISKnhH50yQkVPCP7pghIqfEfXTBCZU+I8unCEyp8R5dKELlT4jy6EIfKnxFl1IQeVfiDLqQg8q/EmXEhJ5R+J"
        "MuJCTyj8aZYSFwPTye36Zbganm9v0y3A1PN7bpnuAqe723THcBU/3sumO4Sp3vZdMdxlTvey6Q7nKne9l0B3eVG97LoDu8qt7mXY"
        "HZ5Xb3MuwOzyu3qZfgcnl9vUyyzUJCnk4HFmoSFPNwOLMQkqebgUWYhJU93AoshCSp7uDRZCElTncGiyELKmO4NFkIeVIdyaLIQ8"
        "qA7s0SQh5UB3ZokhDysDuzQJCnlYHVmgSFPLwOe3lmo/FPK9uLNR+Ked7cWYj9U872osxH6p73tRZiPlT3veizEfKnvetFuI+VPe"
        "8aL8R8qW980X4j5Ut75ovxDyrb2zRfiHle3tmg/FPK9vLNB+KeU="
    ),
    60: (
        "gAAAAAAAAA0VsQwfPcld6K2IYPnuSutFbEMHz3JX2itiGD57kr7RWxDB89yV9orYhg+e5Ku0VsQwfPcl3aK2IYPnuSrtFbEMHz3J"
        "12itiGD57kq7RWxDB89yldorYhg+e5yu0VsQwfPcpXaK2IYPnukrtFbEMHz3yV2itiGD575K7RWxDB898ldorYhg+euSu0VsQwfP"
        "3JXaK2IYPn7krtFbEMHz9yV2itiGD5+5K7RWxDB8vcldorYhg+nuSu0VsQwfz3JXaK2IYP57krtFbEMH89yV2itiGD+e5K7RWxDB"
        "/PcldorYhgvnuSu0VsQwnz3JXaK2IYj57krtFbEMh89yV2itiGg+e5K7RWxDwfPcldorYh4PnuSu0VsQsHz3JXaK2ImD57krtFbE"
        "jB89yV2itihg+e5K7RWxwwfPcldorYoYPnuSu0VskMHz3JXaK2iGD57krtFbxDB89yV2it4hg+e5K7RWsQwfPcldor2IYPnuSu0V"
        "7EMHz3JXaKtiGD57krtF2xDB89yV2irYhg+e5K7R1sQwfPcldoq2IYPnuSu0lbEMHz3JXaitiGD57krtxWxDB89yV2orYhg+e5K7"
    ),
    108: (
        "gAAAAAAAAAAAAAAAAA08C3VMELGZy981RL8N6eBbqmCFjM5e+aol+GtPAt1TBCxmcvfNUS/D2ngW6pghYzOXvmqJfh7TwLdUwQsZ"
        "nL3zVEvwtp4FuqYIWMzl75qiX4m08C3VMELGZy981RL8jaeBbqmCFjM5e+aol+htPAt1TBCxmcvfNUS/w2ngW6pghYzOXvmqJf4b"
        "TwLdUwQsZnL3zVEv8Np4FuqYIWMzl75qiX+G08C3VMELGZy981RL/DaeBbqmCFjM5e+aol/htPAt1TBCxmcvfNUSvw2ngW6pghYz"
        "OXvmqJ34bTwLdUwQsZnL3zVEr8Np4FuqYIWMzl75qil+G08C3VMELGZy981Ry/DaeBbqmCFjM5e+aopfhtPAt1TBCxmcvfNUkvw2"
        "ngW6pghYzOXvmqiX4bTwLdUwQsZnL3zVxL8Np4FuqYIWMzl75qol+G08C3VMELGZy9810S/DaeBbqmCFjM5e+aqJfhtPAt1TBCxm"
        "cvfN1Evw2ngW6pghYzOXvmqiX4bTwLdUwQsZnL3z1RL8Np4FuqYIWMzl756ol+G08C3VMELGZy98tUS/DaeBbqmCFjM5e+mqJfht"
        "PAt1TBCxmcvfzVEvw2ngW6pghYzOXv5qiX4bTwLdUwQsZnL381RL8Np4FuqYIWMzl7+aol+G08C3VMELGZy9/NUS/DaeBbqmCFjM"
        "5evmqJfhtPAt1TBCxmcv3zVEvw2ngW6pghYzOX75qiX4bTwLdUwQsZnL981RL8Np4FuqYIWMzl++aol+G08C3VMELGZyvfNUS/Da"
        "eBbqmCFjM53vmqJfhtPAt1TBCxmcr3zVEvw2ngW6pghYzOl75qiX4bTwLdUwQsZny981RL8Np4FuqYIWMz5e+aol+G08C3VMELGZ"
        "8vfNUS/DaeBbqmCFjMuXvmqJfhtPAt1TBCxmnL3zVEvw2ngW6pghYzzl75qiX4bTwLdUwQsZ5y981RL8Np4FuqYIWMs5e+aol+G0"
        "8C3VMELGmcvfNUS/DaeBbqmCFjzOXvmqJfhtPAt1TBCx5nL3zVEvw2ngW6pghYszl75qiX4bTwLdUwQsmZy981RL8Np4FuqYIWjM"
        "5e+aol+G08C3VMELxmcvfNUS/DaeBbqmCF4zOXvmqJfhtPAt1TBCsZnL3zVEvw2ngW6pgh2Mzl75qiX4bTwLdUwQrGZy981RL8Np"
        "4FuqYIljM5e+aol+G08C3VMEixmcvfNUS/DaeBbqmChYzOXvmqJfhtPAt1TBwsZnL3zVEvw2ngW6pgoWMzl75qiX4bTwLdUwkLGZ"
        "y981RL8Np4FuqYiFjM5e+aol+G08C3VMhCxmcvfNUS/DaeBbqmghYzOXvmqJfhtPAt1TwQsZnL3zVEvw2ngW6p4IWMzl75qiX4bT"
        "wLdUsELGZy981RL8Np4FuqmCFjM5e+aol+G08C3VzBCxmcvfNUS/DaeBbqpghYzOXvmqJfhtPAt10wQsZnL3zVEvw2ngW6qYIWMz"
        "l75qiX4bTwLd1MELGZy981RL8Np4FuqmCFjM5e+aol+G08C31TBCxmcvfNUS/DaeBb6pghYzOXvmqJfhtPAt9UwQsZnL3zVEvw2n"
        "gWuqYIWMzl75qiX4bTwL3VMELGZy981RL8Np4F7qmCFjM5e+aol+G08Ct1TBCxmcvfNUS/DaeB26pghYzOXvmqJfhtPArdUwQsZn"
        "L3zVEvw2ngluqYIWMzl75qiX4bTwi3VMELGZy981RL8Np4hbqmCFjM5e+aol+G08gt1TBCxmcvfNUS/DaegW6pghYzOXvmqJfhtP"
        "wLdUwQsZnL3zVEvw2n4FuqYIWMzl75qiX4bT8C3VMELGZy981RL8Np+BbqmCFjM5e+aol+G0vAt1TBCxmcvfNUS/DangW6pghYzO"
        "XvmqJfhtzwLdUwQsZnL3zVEvw2p4FuqYIWMzl75qiX4b"
    ),
    140: (
        "gAAAAAAAAAAAAAAAAAAAAAANhVu5hgyFJfBXwW17PnmIlXnsKt3MMGQpL4K+C2vZ88xEq8thVu5hgyFJfBXwW17PnmIlXpsKt3MM"
        "GQpL4K+C2vZ88xEq/NhVu5hgyFJfBXwW17PnmIlX5sKt3MMGQpL4K+C2vZ88xEq/NhVu5hgyFJfBXwW17PnmIlX5sKt3MMGQpL4K"
        "+C2vZ88xEqvNhVu5hgyFJfBXwW17PnmIld5sKt3MMGQpL4K+C2vZ88xEqvNhVu5hgyFJfBXwW17PnmIl15sKt3MMGQpL4K+C2vZ8"
        "8xEqvNhVu5hgyFJfBXwW17PnmInV5sKt3MMGQpL4K+C2vZ88xEqvNhVu5hgyFJfBXwW17PnmIpV5sKt3MMGQpL4K+C2vZ88xHKvN"
        "hVu5hgyFJfBXwW17PnmIpV5sKt3MMGQpL4K+C2vZ88xJKvNhVu5hgyFJfBXwW17PnmKJV5sKt3MMGQpL4K+C2vZ88xxKvNhVu5hg"
        "yFJfBXwW17PnmKJV5sKt3MMGQpL4K+C2vZ88yRKvNhVu5hgyFJfBXwW17PnmiJV5sKt3MMGQpL4K+C2vZ888RKvNhVu5hgyFJfBX"
        "wW17PnniJV5sKt3MMGQpL4K+C2vZ88sRKvNhVu5hgyFJfBXwW17PnpiJV5sKt3MMGQpL4K+C2vZ8/MRKvNhVu5hgyFJfBXwW17Pn"
        "5iJV5sKt3MMGQpL4K+C2vZ8/MRKvNhVu5hgyFJfBXwW17Pn5iJV5sKt3MMGQpL4K+C2vZ8vMRKvNhVu5hgyFJfBXwW17Pp5iJV5s"
        "Kt3MMGQpL4K+C2vZ/PMRKvNhVu5hgyFJfBXwW17P55iJV5sKt3MMGQpL4K+C2vZ/PMRKvNhVu5hgyFJfBXwW17P55iJV5sKt3MMG"
        "QpL4K+C2vZ/PMRKvNhVu5hgyFJfBXwW17L55iJV5sKt3MMGQpL4K+C2vafPMRKvNhVu5hgyFJfBXwW17z55iJV5sKt3MMGQpL4K+"
        "C2vefPMRKvNhVu5hgyFJfBXwW16z55iJV5sKt3MMGQpL4K+C2v2fPMRKvNhVu5hgyFJfBXwW1+z55iJV5sKt3MMGQpL4K+C2v2fP"
        "MRKvNhVu5hgyFJfBXwW1+z55iJV5sKt3MMGQpL4K+C2r2fPMRKvNhVu5hgyFJfBXwW3ez55iJV5sKt3MMGQpL4K+C2r2fPMRKvNh"
        "Vu5hgyFJfBXwW9ez55iJV5sKt3MMGQpL4K+C3r2fPMRKvNhVu5hgyFJfBXwWtez55iJV5sKt3MMGQpL4K+C9r2fPMRKvNhVu5hgy"
        "FJfBXwXtez55iJV5sKt3MMGQpL4K+Ctr2fPMRKvNhVu5hgyFJfBXwdtez55iJV5sKt3MMGQpL4K+Ctr2fPMRKvNhVu5hgyFJfBXw"
        "ltez55iJV5sKt3MMGQpL4K+Itr2fPMRKvNhVu5hgyFJfBXyFtez55iJV5sKt3MMGQpL4K+gtr2fPMRKvNhVu5hgyFJfBX8Ftez55"
        "iJV5sKt3MMGQpL4K/gtr2fPMRKvNhVu5hgyFJfBX8Ftez55iJV5sKt3MMGQpL4K/gtr2fPMRKvNhVu5hgyFJfBX8Ftez55iJV5sK"
        "t3MMGQpL4Kvgtr2fPMRKvNhVu5hgyFJfBd8Ftez55iJV5sKt3MMGQpL4Kvgtr2fPMRKvNhVu5hgyFJfB18Ftez55iJV5sKt3MMGQ"
        "pL4Kvgtr2fPMRKvNhVu5hgyFJfCV8Ftez55iJV5sKt3MMGQpL4ivgtr2fPMRKvNhVu5hgyFJfIV8Ftez55iJV5sKt3MMGQpL6Cvg"
        "tr2fPMRKvNhVu5hgyFJfwV8Ftez55iJV5sKt3MMGQpL+Cvgtr2fPMRKvNhVu5hgyFJfwV8Ftez55iJV5sKt3MMGQpL+Cvgtr2fPM"
        "RKvNhVu5hgyFJfwV8Ftez55iJV5sKt3MMGQpK+Cvgtr2fPMRKvNhVu5hgyFJ3wV8Ftez55iJV5sKt3MMGQpK+Cvgtr2fPMRKvNhV"
        "u5hgyFKXwV8Ftez55iJV5sKt3MMGQpy+Cvgtr2fPMRKvNhVu5hgyFKXwV8Ftez55iJV5sKt3MMGQqS+Cvgtr2fPMRKvNhVu5hgyF"
        "yXwV8Ftez55iJV5sKt3MMGQqS+Cvgtr2fPMRKvNhVu5hgyHSXwV8Ftez55iJV5sKt3MMGQqS+Cvgtr2fPMRKvNhVu5hgyJSXwV8F"
        "tez55iJV5sKt3MMGSKS+Cvgtr2fPMRKvNhVu5hgyhSXwV8Ftez55iJV5sKt3MMGcKS+Cvgtr2fPMRKvNhVu5hgyhSXwV8Ftez55i"
        "JV5sKt3MMGkKS+Cvgtr2fPMRKvNhVu5hg8hSXwV8Ftez55iJV5sKt3MMHkKS+Cvgtr2fPMRKvNhVu5hgshSXwV8Ftez55iJV5sKt"
        "3MMJkKS+Cvgtr2fPMRKvNhVu5hiMhSXwV8Ftez55iJV5sKt3MMhkKS+Cvgtr2fPMRKvNhVu5hoMhSXwV8Ftez55iJV5sKt3MPBkK"
        "S+Cvgtr2fPMRKvNhVu5h4MhSXwV8Ftez55iJV5sKt3MLBkKS+Cvgtr2fPMRKvNhVu5iYMhSXwV8Ftez55iJV5sKt3MjBkKS+Cvgt"
        "r2fPMRKvNhVu5oYMhSXwV8Ftez55iJV5sKt3PDBkKS+Cvgtr2fPMRKvNhVu54YMhSXwV8Ftez55iJV5sKt3LDBkKS+Cvgtr2fPMR"
        "KvNhVu6YYMhSXwV8Ftez55iJV5sKt3zDBkKS+Cvgtr2fPMRKvNhVu+YYMhSXwV8Ftez55iJV5sKt3zDBkKS+Cvgtr2fPMRKvNhVu"
        "uYYMhSXwV8Ftez55iJV5sKt9zDBkKS+Cvgtr2fPMRKvNhVvuYYMhSXwV8Ftez55iJV5sKt9zDBkKS+Cvgtr2fPMRKvNhVruYYMhS"
        "XwV8Ftez55iJV5sKvdzDBkKS+Cvgtr2fPMRKvNhV7uYYMhSXwV8Ftez55iJV5sKrdzDBkKS+Cvgtr2fPMRKvNhXbuYYMhSXwV8Ft"
        "ez55iJV5sKrdzDBkKS+Cvgtr2fPMRKvNhdbuYYMhSXwV8Ftez55iJV5sKrdzDBkKS+Cvgtr2fPMRKvNh1buYYMhSXwV8Ftez55iJ"
        "V5sKrdzDBkKS+Cvgtr2fPMRKvNiVbuYYMhSXwV8Ftez55iJV5sirdzDBkKS+Cvgtr2fPMRKvNoVbuYYMhSXwV8Ftez55iJV5vCrd"
        "zDBkKS+Cvgtr2fPMRKvN4VbuYYMhSXwV8Ftez55iJV5rCrdzDBkKS+Cvgtr2fPMRKvM="
    ),
    156: (
        "5QTDIKfiYUoZH5opCUWcag7cFY8oJhkFPxMKUMj80UhKLKNQduCs+UEwyCn4mFKGR+aKQlFhGoO3BWfKCYZBX8TClDIfNFISiwjU"
        "HbgrPlBMMgr+JhShkPmikJRcRqDtwVnygmGQR/EwpQynzRSEouI1B24KT5QTDII/iYUoZz5opCUTEag7cFp8oJhkEfxMKUMZ80Uh"
        "KNiNQduCU+UEwyCP4mFKGs+aKQlCxGoO3BKfKCYZBH8TClDWfNFISlYjUHbgFPlBMMkj+JhShLPmikJSsRqDtwCnygmGWR/EwpQF"
        "nzRSEpWI1B24BT5QTDLI/iYUoiz5opCQrEag7cgp8oJhhkfxMKURZ80UhIViNQduQU+UEwwyP4mFKos+aKQgKxGoO3IKfKCYYZH8"
        "TClUWfNFIUFYjUHbkFPlBMMMj+JhSKLPmikOCsRqDtyCnygmCGR/EwplFnzRSHBWI1B2ZBT5QTFDI/iYUSiz5opDgrEag7Mgp8oJ"
        "ihkfxMKJRZ80UlwViNQdGQU+UExQyP4mFEos+aKW4KxGoODIKfKCcoZH8TCCUWfNFLcFYjUHhkFPlBKUMj+JhhKLPmiluCsRqDwy"
        "CnyglKGR/EwQlFnzRW3BWI1BYZBT5QSlDI/iYISiz5ovbgrEagMMgp8oJShkfxMkJRZ80TtwViNQmGQU+UApQyP4mSEos+aJ24Kx"
        "GoTDIKfKAUoZH8TpCUWfNA7cFYjUJhkFPlEKUMj+JUhKLPmgduCsRqEwyCnymFKGR/EKQlFnzQO3BWI1CYZBT5TClDI/iFISiz5s"
        "HbgrEaBMMgp8phShkfxikJRZ8yDtwViNgmGQU+UwpQyP4RSEos+dB24KxGQTDIKfKYUoZH8opCUWfKg7cFYjoJhkFPhMKUMj+0Uh"
        "KLPlQduCsRUEwyCnwmFKGR/aKQlFn2oO3BWIKCYZBT8TClDI/NFISiz7UHbgrElBMMgp+JhShkfmikJRZ5qDtwViygmGQU/EwpQy"
        "PzRSEos41B24KxDs9a83HKCYZBTcr4kfU/NFISizB2etebnlBMMgpuV8SPqfmikJRZA7PWvN3ygmGQU3K+JH1PzRSEosAdnrXm75"
        "QTDIK7lfEj6j5opCUWgOz1rzZ8oJhkFdyviR9R80UhKLwHZ615s+UEwyCO5XxI+s+aKQlF4Ds9a8yfKCYZBncr4kfWfNFISicB2e"
        "tedPlBMMgTuV8SPrPmikJRuA7PWvKnygmGQp3K+JH1nzRSEo3AdnrXhT5QTDIU7lfEj6z5opCUbgOz1rwp8oJhkqdyviR5Z80UhK"
        "NwHZ614U+UEwy1O5XxI4s+aKQlm4Ds9a4KfKCYZ6ncr4kcWfNFISzcB2etcFPlBMM9TuV8SKLPmikJ5uA7PWqCnygmG+p3K+JFFn"
        "zRSE83AdnrRBT5QTDfU7lfEiiz5opCebgOz1sgp8oJhPqdyviRRZ80UhvNwHZ62QU+UEwH1O5XxMos+aKQXm4Ds9bIKfKCYj6ncr"
        "4iUWfNFIrzcB2epkFPlBMR9TuV8RKLPmik15uA7PQyCnygmI+p3K+IlFnzRSa83AdnoZBT5QTkfU7lfASiz5optebgOz0Mgp8oJS"
        "PqdyvkJRZ80UWvNwHZ+GQU+UEJH1O5XyEos+aKrXm4Ds7DIKfKCEj6ncr5CUWfNF1rzcB2ZhkFPlBiR9TuV8hKLPmi615uA7MwyC"
        "nygxI+p3K6QlFnzR9a83AdiYZBT5Q4kfU7ldISiz5oetebgOxMMgp8o8SPqdyqkJRZ80PWvNwHYmGQU+U+JH1O5RSEos+anrXm4D"
        "oTDIKfKfEj6ncopCUWfNz1rzcBwJhkFPlviR9TuUUhKLPmZ615uA8EwyCnyXxI+p3KKQlFnzs9a83AaCYZBT5r4kfU7lFISiz52e"
        "tebgNBMMgp8V8SPqd2ikJRZ87PWvNwCgmGQU+K+JH1O7RSEos+dnrXm4BQTDIKflfEj6nZopCUWfOz1rzcEoJhkFPyviR9Ts0UhK"
        "LPHZ615uGUEwyCn5XxI+p2aKQlFnGXW9rpkag7cFY5QTDIKYdnrXm4DLre10yNQduCs8oJhkFIOz1rzcBl1va6ZGoO3BW+UEwyCg"
        "HZ615ugy63tdIjUHbgrfKCYZBQDs9a83wZdb2ukRqDtwVPlBMMgsB2etebYMut7XWI1B24KnygmGQWA7PWvNMGXW9rrEag7cFT5Q"
        "TDIPAdnrXmmDLre11iNQduCp8oJhkDgOz1rzTBl1va6xGoO3BU+UEwyFwHZ615pgy63tdYjUHbgKfKCYZG4Ds9a80wZdb2qsRqDt"
        "wFPlBMMjcB2ete6YMut7RWI1B24CnygmGRuA7PWvdMGXW9orEag7cBT5QTDM3AdnrXumDLrewViNQdugp8oJhmbgOz1rXTBl1vYK"
        "xGoO3QU+UEw3NwHZ61rpgy63sFYjUHbIKfKCYfm4Ds9a10wZdb2CsRqDtkFPlBMLzcB2eta6YMut/BWI1B2yCnygmF5uA7PWtdMG"
        "XW7grEag7ZBT5QTC83Adnr2umDLrdwViNQdMgp8oJlebgOz17XTBl1u4KxGoOGQU+UE2vNwHZ69rpgy6zcFYjUHDIKfKCbXm4Ds9"
        "e10wZdduCsRqDhkFPlBNrzcB2eva6YMuu3BWI1BwyCnygi15uA7P3tdMGXXbgrEagYZBT5QVa83Adnb2umDLrtwViNQMMgp8oOte"
        "bgOzt7XTBlx24KxGomGQU+UHWvNwHZW9rpgy47cFYjUTDIKfKHrXm4Dsre10wZYduCsRqJhkFPlD1rzcB21va6YMoO3BWI1EwyCn"
        "yh615uA763tdMGUHbgrEaCYZBT5U9a83Addb2umDKDtwViNBMMgp8uetebgOut7XTBlB24KxGgmGQU+TPWvNwHXW9rpgyg7cFYjQ"
        "TDIKfNnrXm4DLre10wdQduCsRoJhkFPmz1rzcBl1va6YOoO3BWIUEwyCn3Z615uAy63tdMDUHbgrEKCYZBT7s9a83AZdb2umBqDt"
        "wVilBMMgp52etebgMut7XTA1B24KxygmGQU47PWvNwcr4kfU4y63tdM8TClDI/KCYZBTuV8SPqYZdb2um+JhShkflBMMgp3K+JH1"
        "IMut7XT/EwpQyPygmGQU7lfEj6kGXW9rp/iYUoZD5QTDIKdyviR9WDLre10fxMKUMh8oJhkFO5XxI+rBl1va6P4mFKGU+UEwyCnc"
        "r4kfRgy63tdH8TClDKfKCYZBTuV8SPswZdb2uj+JhShlPlBMMgp3K+JHyYMut7XR/EwpQynygmGQU7lfEj9MGXW9rI/iYUoZT5QT"
        "DIqdyviR+mDLre1kfxMKUIp8oJhk1O5XxI/TBl1vayP4mFKAU+UEwy6ncr4kbpgy63tZH8TClAKfKCYZ9TuV8SN0wZdb2Mj+JhSk"
        "FPlBMM+p3K+JC6YMut7GR/EwpSCnygmGfU7lfEldMGXW9DI/iYUpBT5QTDPqdyviWumDLrehkfxMKUgp8oJhH1O5XxLXTBl1vQyP"
        "4mFOQU+UEwj6ncr4lrpgy63oZH8TCjIKfKCYR9TuV8W10wZdbUMj+JhRkFPlBMI+p3K+Pa6YMutKGR/EwoyCnygmkfU7lfHtdMGX"
        "WlDI/iYQZBT5QTSPqdyvj2umDLrShkfxMMMgp8oJJH1O5X17XTBl1pQyP4mGGQU+UEEj6ncr+9rpgy6UoZH8TDDIKfKCiR9TuV7e"
        "10wZdKUMj+JhhkFPlBxI+p3K9va6YMuFKGR/E0wyCnyg4kfU7la3tdMGXClDI/iaYZBT5Q8SPqdytb2umDLhShkfxJMMgp8o+JH1"
        "O5Wt7XTBlwpQyP4gmGQU+UfEj6ncvW9rpgyYUoZH8QTDIKfKviR9TuTre10wZMKUMj+IJhkFPlXxI+p3N1va6YMmFKGR/EEwyCny"
        "r4kfU7i63tdMGTClDI/iCYZBT5V8SPqdxdb2umDJhShkf1BMMgp8K+JH1O8ut7XTBEwpQyP6gmGQU+lfEj6neXW9rpgiYUoZH5QT"
        "DIKfyviR9TrLre10wxMKUMj8oJhkFP5XxI+pxl1va6Y4mFKGR+UEwyCn"
    ),
    172: (
        "jPXZuvMb8KbZQ/esr0L1NePSYBkvFGeuzdeZ34U2yh+9ZXoXqa8ekwDJeCM9dm68zvwptlD/6yvQvU049JgGS8EZ67N153fhTbKH"
        "31leheppx6TAMl6Iz12brzu/Cm2UPvrK9C9TDj0mAZL8Rnrs3Xnd+FNsodfWV6F6nHHpMAyXYjPXZuve78KbZQ6+sr0L1OOPSYBk"
        "sxGeuzdf934U2yh19ZXoXqccekwDJZiM9dm6/7vwptlBr6yvQvV449JgGSzEZ67N1v3fhTbKDX1leherxx6TAMnmIz12bqfu/Cm2"
        "UmvrK9C9Xjj0mAZPMRnrs3Q/d+FNspNfWV6F6vHHpMAyeYjPXZuh+78KbZaa+sr0LxeOPSYBm8xGeuzdD934U2yU19ZXoXy8cekw"
        "DF5iM9dm6H7vwptmpr6yvQul449JgGrzEZ67N0P3fhTbNTX1lehZLxx6TAPXmIz12aofu/Cm26mvrK9CyXjj0mAevMRnrsxQ/d+F"
        "Nv1NfWV6FkvHHpMAdeYjPXZyh+78KbXqa+sr0LJeOPSYC68xGeuzlD934U2vU19ZXoGS8cekwN15iM9djKH7vwptepr6yvQMl449"
        "JgbrzEZ67WUP3fhTS9TX1legZLxx6TA3XmIz13sofu/CmF6mvrK9AyXjj0mJuvMRnrrZQ/d+FML1NfWV6BkvHHpMzdeYjPXWyh+7"
        "8KYXqa+srwDJeOPSZm68xGevtlD934UQvU19ZXgGS8cek7N15iM9bbKH7vwqhepr6yvAMl449J2brzEZ6m2UP3fhdC9TX1leAZLx"
        "x6Ts3XmIz1Nsofu/C6F6mvrKsAyXjj0nZuvMRnqbZQ/d+H0L1NfWUYBkvHHpuzdeYjPU2yh+78HoXqa+sswDJeOPRdm68xGeptlD"
        "934vQvU19ZJgGS8ceq7N15iM5TbKH7vxehepr6yTAMl44912brzEZim2UP3fq9C9TX1kmAZLxx7rs3XmIyFNsofu/V6F6mvrJMAy"
        "Xjj/XZuvMRkKbZQ/d8r0L1NfXSYBkvHHeuzdeYjYU2yh+75XoXqa+ukwDJeOM9dm68xHwptlD93yvQvU19dJgGS8cZ67N15iPhTb"
        "KH7tlehepr76TAMl44z12brzEfCm2UP3bK9C9TXz0mAZLxxnrs3XmJ+FNsofuWV6F6mvnpMAyXjjPXZuvMT8KbZQ/esr0L1NePSY"
        "BkvHGeuzdeY34U2yh+9ZXoXqa8ekwDJeMgesk14FGeuzdeYOFs/zaHdZXoXqaxA9ZJrwKM9dm68wcLZ/m0P6yvQvU1iB6yTXgEZ6"
        "7N15o4Wz/Nof1leheppED1kmvAIz12brzxwtn+bQvrK9C9TSIHrJNeERnrs3XnjhbP82hfWV6F6mEQPWSa8YjPXZuvHHC2f5tC+s"
        "r0L1MIgesk14xGeuzdeOOFs/zaV9ZXoXqQRA9ZJrxiM9dm68ccLZ/m1r6yvQvUAiB6yTXzEZ67N1w44Wz/NrX1leheqBED1kmvmI"
        "z12brhxwtn+bGvrK9C9cCIHrJNfMRnrs3VDjhbP83NfWV6F64EQPWSa+YjPXZuqHHC2f5qa+sr0L3wIgesk08xGeuzd0OOFs/zU1"
        "9ZXoXngRA9ZJt5iM9dm5occLZ/mpr6yvQvvAiB6yTLzEZ67N7Q44Wz/NTX1lehdeBED1knXmIz12b2hxwtn+amvrK9C68CIHrJOv"
        "MRnrs1tDjhbP91NfWV6F14EQPWSdeYjPXZjaHHC2f/qa+sr0JrwIgesk68xGeuzm0OOFs/vU19ZXoTXgRA9ZN15iM9dnNoccLZ/e"
        "pr6yvQmvAiB6ybrzEZ67ObQ44Wz69TX1lehNeBED1k3XmIz1282hxwtnl6mvrK9Ca8CIHrJuvMRnrv5tDjhbOL1NfWV6k14EQPWT"
        "deYjPXfzaHHC2YXqa+sr1JrwIgetm68xGeu/m0OOFswvU19ZXiTXgRA9bN15iM9f/NoccLYhepr6yvkmvAiB62brzEZ63+bQ44W1"
        "C9TX1lfJNeBED1s3XmIz1P82hxwt6F6mvrK2Sa8CIHvZuvMRnqf5tDjhb0L1NfWVsk14EQPOzdeYjPc/zaHHC3oXqa+spZJrwIgf"
        "dm68xGeZ/m0OOFvQvU19ZayTXgRA67N15iM+z/NoccLehepr6y1kmvAiB12brzEZ9n+bQ44S9C9TX1nrJNeBEDrs3XmIzbP82hxw"
        "16F6mvrPWSa8CIHXZuvMRm2f5tDjgr0L1NfWesk14EQeuzdeYjFs/zaHHBXoXqa+s9ZJrwIg9dm68xGLZ/m0OOSvQvU19R6yTXgR"
        "B67N15iMWz/Nocdlehepr6D1kmvAiT12brzEQtn+bQ47K9C9TX0HrJNeBFnrs3XmIhbP82hx2V6F6mvgPWSa8CLPXZuvMTC2f5tD"
        "isr0L1Nfgesk14EGeuzdeYuFs/zaHFZXoXqa9A9ZJrwIM9dm68xcLZ/m0OayvQvU1xTUL0KymPSYBkvGM9dm68wQPWSa8CCmoXoV"
        "lcekwDJeEZ67N15ggesk14EFNQvQrK49JgGS8Iz12brzRA9ZJrwIKahehWRx6TAMl4Rnrs3XmiB6yTXgQU1C9Csjj0mAZL4jPXZu"
        "vJED1kmvCgpqF6FZHHpMAyXxGeuzdeCIHrJNeFBTUL0K2OPSYBktiM9dm68EQPWSa8KCmoXoV8cekwDJTEZ67N14Igesk16UFNQv"
        "Qr449JgGSmIz12brgRA9ZJr8oKahehTxx6TAMnMRnrs3XAiB6yTXZQU1C9C3jj0mAZOYjPXZuuBED1kmuygpqF6EvHHpMAy8xGeu"
        "zdcCIHrJNVlBTUL0JeOPSYBl5iM9dm74EQPWSarKCmoXoS8cekwDLzEZ67NzwIgesk1WUFNQvQl449JgGXmIz12b3gRA9ZJisoKa"
        "hehLxx6TAOvMRnrs2vAiB6yTFZQU1C9SXjj0mAdeYjPXZteBED1kkKygpqF7kvHHpMA68xGeuza8CIHrJIVlBTULzJeOPSYB15iM"
        "9dm14EQPWSQrKCmoXmS8cekwLrzEZ67JrwIgesmhWUFNQuMl449Jg3XmIz12TXgRA9ZNCsoKahYZLxx6TBuvMRnrsmvAiB6y6FZQ"
        "U1CgyXjj0mDdeYjPXZNeBED1n0KygpqEBkvHHpMm68xGeuya8CIHrHoVlBTUIDJeOPSbN15iM9ck14EQPWvQrKCmoAGS8cek2brz"
        "EZ65JrwIgetehWUFNRAMl449Js3XmIz1yTXgRA9S9CsoKamAZLxx6TZuvMRnrkmvAiB6F6FZQU1MAyXjj0uzdeYjPTJNeBED0L0K"
        "ygpqYBkvHHpdm68xGe2Sa8CIHoXoVlBTUwDJeOPS7N15iM8sk14EQPQvQrKCmpgGS8cel2brzEZ9ZJrwIgehehWUFMTAMl449rs3"
        "XmIz6yTXgRA1C9CsoKcmAZLxx7XZuvMRn1kmvAiBqF6FZQUpMAyXjj+uzdeYjPrJNeBEDUL0KygpSYBkvHH9dm68xGPWSa8CIGoX"
        "oVlBWkwDJeON67N15iMesk14EQNQvQrKC9JgGS8cT12brzEY9ZJrwIiahehWUF6TAMl44nrs3XmIh6yTXgRE1C9CsoL0mAZLxzPX"
        "ZuvMQD1kmvAipqF6FZQHpMAyXjmeuzdeYgHrJNeBFTUL0KygPSYBkvHM9dm68xQPWSa8CCmoXoVlEekwDJeMZ67N15igesk14EOF"
        "s/zaHCmoXoVlN+FNsofsZ67N15gcLZ/m0OFNQvQrK78KbZQ/Iz12brzI4Wz/NoYKahehWV34U2yh+Rnrs3Xmxwtn+bQwU1C9Csrv"
        "wptlD4jPXZuvPjhbP82ggpqF6FZ3fhTbKHxGeuzdeXHC2f5tFBTUL0Kzu/Cm2UPiM9dm68OOFs/zaKCmoXoVvd+FNsobEZ67N14c"
        "cLZ/m0UFNQvQr+78KbZQmIz12brw44Wz/NsoKahehX934U2yhMRnrs3Xhxwtn+bZQU1C9Cn7vwptlGYjPXZutDjhbP82ygpqF6FP"
        "3fhTbKcxGeuzdaHHC2f5tlBTUL0Ifu/Cm2V5iM9dm60OOFs/zLKCmoXoQ/d+FNsrzEZ67N1occLZ/nWUFNQvQh+78KbZXmIz12br"
        "Q44Wz/KsoKahehD934U2yvMRnrs32hxwtn+FZQU1C9KH7vwptleYjPXZttDjhbP8KygpqF6UP3fhTba8xGeuzTaHHC2f4VlBTUL0"
        "ofu/Cm315iM9dmm0OOFs/wrKCmoXpQ/d+FNrrzEZ67PNoccLZ+hWUFNQvyh+78KbXXmIz12ebQ44Wz9CsoKahdlD934U3uvMRnrs"
        "82hxwtn6FZQU1C7KH7vwprdeYjPXb5tDjhbP0KygpqF2UP3fhTG68xGeu/zaHHC2foVlBTUJsofu/CnN15iM9d/m0OOFsvQrKCmo"
        "bZQ/d+FObrzEZ67/NoccLZehWUFNQ2yh+78KM3XmIz13+bQ44Wy9CsoKahtlD934VZuvMRnrP82hxwtl6FZQU1DbKH7vwuzdeYjP"
        "Wf5tDjhaL0Kygpqm2UP3fhdm68xGes/zaHHCwXoVlBTVNsofu/C7N15iM9Z/m0OOFwvQrKCmqbZQ/d+F2brzEZ6z/NoccKhehWUF"
        "NU2yh+78Ls3XmIz9n+bQ44VC9CsoKYptlD935XZuvMRnbP82hxwqF6FZQUxTbKH7v2uzdeYjO2f5tDjhUL0KygpCm2UP3f9dm68x"
        "GVs/zaHHGoXoVlBSFNsofu/67N15iMLZ/m0OONQvQrKCsKbZQ/d712brzEYWz/NoccahehWUF4U2yh+7nrs3XmIwtn+bQ481C9Cs"
        "oLwptlD93PXZuvMRhbP82hxpqF6FZQfhTbKH7ueuzdeYjC2f5tDjTUL0Kyg/Cm2UP3M9dm68xOFs/zaHCmoXoVlB+FNsofuZ67N1"
        "5icLZ/m0OFNQvQrKL8KbZQ/Yz12brzE="
    ),
}

# sha256 of each table as int8 ±1 bytes, row-major (what tests check the decoding against).
TABLE_SHA256: dict[int, str] = {
    12: "67507aecbe2abee5607ebc930edc6e70f5046bd415503c71e71ac7dc6ddc9e50",
    20: "f54960fecf1ccf70671b403318d07fd1babfee079c6ebd627812276c3f5d91ed",
    28: "a6cb994c78f9acd4ce172a154b97e3982594cc0124ce7af90cb88810b9509a8c",
    36: "d674d8240e6b622bff2b54fd5f16f903ef5ccbde6e5fba55a73e6b8616ce936d",
    40: "b36c95bcae918f982ba87b8a98828c6ee5232919436228600c0714b67fe82036",
    52: "9ee082772819b1055d61f2d6bc89d814caaeb2fdc5f4d8bb54317842856be195",
    60: "091e76fba0aef58371335b478d7b3f320fcc77b1185eff7d2ed962cd5bc5a048",
    108: "690a34c6c9ed2f0edaf44022cfe6147d7e788cc555505ed5293db3c255582370",
    140: "b9ff01506ffe4db50af93f4c21e0c5af43159fbf5ccf5f8366f1c0efeee84417",
    156: "99a1b852ce559ffd6291cfc39889b4963b068b27116191ce7fc24efcacc538fd",
    172: "378ef12c7cc31f3ea558e1c66b9552a83128f8f732b0bc094b864c8e120d84bd",
}


def is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@functools.lru_cache(maxsize=None)
def _known_int8(m: int) -> torch.Tensor:
    if m not in _TABLES_B64:
        raise ValueError(f"no known Hadamard matrix of size {m}; known: {', '.join(map(str, sorted(_TABLES_B64)))}")
    raw = torch.frombuffer(bytearray(base64.b64decode(_TABLES_B64[m])), dtype=torch.uint8)
    bits = ((raw.unsqueeze(1) >> torch.arange(7, -1, -1, dtype=torch.uint8)) & 1).reshape(-1)[: m * m]
    return (bits.to(torch.int8) * 2 - 1).reshape(m, m)


def known_hadamard(m: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The known m×m Hadamard block (a fresh tensor; ±1 entries)."""
    return _known_int8(m).to(dtype)


def sylvester_hadamard(p: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dense Sylvester H_p in natural order, for tests and small p only."""
    if not is_pow2(p):
        raise ValueError(f"Sylvester Hadamard matrices exist for powers of two, not {p}")
    idx = torch.arange(p)
    parity = torch.zeros(p, p, dtype=torch.int64)
    anded = idx.unsqueeze(1) & idx.unsqueeze(0)
    while bool(anded.any()):
        parity ^= anded & 1
        anded = anded >> 1
    return (1 - 2 * parity).to(dtype)


def hadamard_factors(n: int) -> tuple[int, int]:
    """(m, p) with n = m·p, p a power of two and m the known block the reference picks (1 for powers of two).

    Raises ValueError when n has no such form (e.g. 24·3 = 72 is 36·2 and fine; 100 is not)."""
    if n < 1:
        raise ValueError(f"Hadamard size must be positive, got {n}")
    for m in KNOWN_SIZES:
        if n % m == 0:
            if not is_pow2(n // m):
                break
            return m, n // m
    else:
        if is_pow2(n):
            return 1, n
    raise ValueError(f"no Hadamard matrix of size {n}: sizes are 2^k or m·2^k with m in "
                     f"{', '.join(map(str, sorted(KNOWN_SIZES)))} (the QWHA reference's rule)")


def supports(n: int) -> bool:
    try:
        hadamard_factors(n)
    except ValueError:
        return False
    return True


def dense_hadamard(n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dense M_n = H_m ⊗ H_p: for tests and small n only (the transforms below never build it)."""
    m, p = hadamard_factors(n)
    h = sylvester_hadamard(p, dtype)
    return torch.kron(known_hadamard(m, dtype), h) if m > 1 else h


# Radix of the butterfly stages: the 2^k factor is split into stages of at most 2^6 = 64 points, each one small
# dense Sylvester block applied as a matmul. Far fewer passes over memory than radix 2 (log2(n) passes of 3 tensor
# ops each) for ≤ 64 multiply-adds per element and stage: 1.5-7x faster than a radix-2 version on the 2-core CI
# CPU (best of 5, one thread: [512, 576] 2.6 -> 0.9 ms, [1536, 576] 23 -> 3.2 ms, [4096, 4096] 2479 -> 366 ms).
_MAX_RADIX_BITS = 6
# Rows are transformed in chunks of about this many elements so that the stages of a big matrix run in cache.
_CHUNK_ELEMENTS = 1 << 20


def stage_sizes(n: int) -> tuple[int, ...]:
    """Axis sizes of the mixed-radix factorisation M_n = H_m ⊗ H_r1 ⊗ H_r2 ⊗ … (row-major), each r ≤ 64."""
    m, p = hadamard_factors(n)
    k = p.bit_length() - 1
    stages = -(-k // _MAX_RADIX_BITS)
    bits = [k // stages + (1 if i < k % stages else 0) for i in range(stages)] if stages else []
    return tuple(([m] if m > 1 else []) + [1 << b for b in bits])


@functools.lru_cache(maxsize=None)
def _sylvester_int8(r: int) -> torch.Tensor:
    return sylvester_hadamard(r, torch.int8)


def wht(x: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """Unnormalised WHT along the last dim: x @ M_nᵀ (or x @ M_n with `transpose`). Differentiable.

    Works in x's dtype (use float32/64: the values grow by up to √n per row norm). M_n = H_m ⊗ H_{2^k} is
    applied as a mixed-radix butterfly: one stage per Kronecker factor (the m-block, then Sylvester blocks of
    ≤ 64 points whose product is H_{2^k} in natural order), O(n·Σ stage sizes) per row, never an n×n matrix.
    """
    n = x.shape[-1]
    sizes = stage_sizes(n)
    has_block = hadamard_factors(n)[0] > 1
    lead = x.shape[:-1]
    flat = x.reshape(-1, n)
    if not sizes:  # n = 1: M = [1]
        return x.clone()
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // n)
    if flat.shape[0] > rows_per_chunk:
        parts = [_wht_rows(c, sizes, has_block, transpose) for c in flat.split(rows_per_chunk)]
        return torch.cat(parts).reshape(*lead, n)
    return _wht_rows(flat, sizes, has_block, transpose).reshape(*lead, n)


def _wht_rows(x: torch.Tensor, sizes: tuple[int, ...], has_block: bool, transpose: bool) -> torch.Tensor:
    """[rows, n] -> [rows, n] with the row index laid out as axes `sizes` (row-major).

    Each stage applies its factor to the LAST axis (a plain [.., r] @ [r, r] product) and then moves that axis to
    the front; after one stage per axis the layout is back in the original order. The known m-block is the first
    axis, so it is transformed last; only it is not symmetric (transpose uses H_mᵀ)."""
    rows, n = x.shape
    y = x
    for i, r in enumerate(reversed(sizes)):
        if has_block and i == len(sizes) - 1:
            a = known_hadamard(r, y.dtype).to(y.device)
            a = a if transpose else a.t()  # row vectors: v·Aᵀ applies A; v·A applies Aᵀ
        else:
            a = _sylvester_int8(r).to(device=y.device, dtype=y.dtype)  # symmetric
        y = y.reshape(-1, r) @ a
        if len(sizes) > 1:
            y = y.reshape(rows, n // r, r).transpose(1, 2)
    return y.reshape(rows, n)


def iwht(x: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """Inverse of `wht(·, transpose)`: M⁻¹ = Mᵀ / n, so iwht(x) = wht(x, not transpose) / n."""
    return wht(x, not transpose) / x.shape[-1]


__all__ = ["KNOWN_SIZES", "TABLE_SHA256", "dense_hadamard", "hadamard_factors", "is_pow2", "iwht",
           "known_hadamard", "supports", "sylvester_hadamard", "wht"]
