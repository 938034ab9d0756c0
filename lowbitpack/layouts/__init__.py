"""Bit-packing layouts: pure-torch references, each the exact inverse of its packer."""
