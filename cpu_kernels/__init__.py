"""BASQ's CPU back end: fused C kernels that give PyTorch's values bit for bit, faster."""
