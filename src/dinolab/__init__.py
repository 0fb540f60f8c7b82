"""dinolab: DINOv2 re-created.

Public API::

    import dinolab
    model = dinolab.load_model("dinov2_vits14")      # official name, timm name, own variant, or a path
    dinolab.list_models()
    tf = dinolab.make_classification_transform()      # resize 256 / crop 224 / ImageNet norm
    feats = dinolab.extract_features(model, ["a.jpg", "b.png"])
"""

from dinolab.data.transforms import fit_to_patch, make_classification_transform, make_dense_transform
from dinolab.models import BackboneOutput, DinoVisionTransformer, create_model, list_models, load_model

__all__ = [
    "BackboneOutput",
    "DinoVisionTransformer",
    "create_model",
    "extract_features",
    "fit_to_patch",
    "list_models",
    "load_model",
    "make_classification_transform",
    "make_dense_transform",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "extract_features":  # imported lazily: pulls in the data/eval stack
        from dinolab.eval.features import extract_features

        return extract_features
    raise AttributeError(name)
