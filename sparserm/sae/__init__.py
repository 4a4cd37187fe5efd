"""One SAE interface (registry / local / trained here with sae-lens), training and quality measures."""
from sparserm.sae.autoencoder import SAELoadError, SparseAutoencoder, load_registry, load_sae
from sparserm.sae.fit import train_sae
from sparserm.sae.quality import evaluate_sae, massive_token_mask

__all__ = ["SAELoadError", "SparseAutoencoder", "evaluate_sae", "load_registry", "load_sae", "massive_token_mask",
           "train_sae"]
