"""The one DP-SGD training and evaluation loop (Opacus clipping, secret sampling and noise)."""
