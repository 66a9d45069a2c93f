"""Small shims over torch.distributed across the torch releases the project supports."""

import torch.distributed as dist

# torch 2.13 renamed all_gather_into_tensor to all_gather_single; torch 2.2 has only the old name.
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
