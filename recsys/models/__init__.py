"""ESU CTR models: layers, `MuseModel` with its variants, and model artifacts (io)."""
from recsys.models.muse import VARIANTS, ModelConfig, MuseModel, VariantSpec, variant_spec

__all__ = ["VARIANTS", "ModelConfig", "MuseModel", "VariantSpec", "variant_spec"]
