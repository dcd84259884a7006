import fastmf
from fastmf import checkpoint

# Checkpoints name their model class through the registry; MF registers itself once
# fastmf.layers decorates it, and until then the tests register it here.
if "MF" not in checkpoint.MODELS:
    checkpoint.register_model(fastmf.MF)
