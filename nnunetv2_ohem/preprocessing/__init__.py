"""Preprocessing extensions that stock nnU-Net can use (normalisation schemes outside nnunetv2's folder)."""
