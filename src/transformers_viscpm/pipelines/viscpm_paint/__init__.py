"""VisCPM-Paint: the diffusers text-to-image pipeline and its CPM-Bee text encoder."""

from .pipeline_viscpm_paint import VisCPMPaintPipeline, paint_prompt
from .text_encoder_viscpm_paint import VisCPMPaintTextEncoder, VisCPMPaintTextEncoderConfig

__all__ = ["VisCPMPaintPipeline", "VisCPMPaintTextEncoder", "VisCPMPaintTextEncoderConfig", "paint_prompt"]


def register() -> None:
    """Make `DiffusionPipeline.from_pretrained` resolve our pipeline, and the Auto classes our text encoder.

    diffusers looks a repo's `_class_name` up as an attribute of the `diffusers` module; the components
    are recorded in `model_index.json` under this package and resolve once it is imported.
    """
    import diffusers
    from diffusers.pipelines import pipeline_loading_utils
    from transformers import AutoConfig, AutoModel

    diffusers.VisCPMPaintPipeline = VisCPMPaintPipeline
    # Components are then recorded as ["transformers_viscpm", class] and resolved from the package's top level, for
    # local folders and hub repos alike (diffusers checks hub listings against its known libraries).
    loadable = {name: ["save_pretrained", "from_pretrained"] for name in ("VisCPMPaintTextEncoder", "CpmBeeTokenizer")}
    pipeline_loading_utils.LOADABLE_CLASSES.setdefault("transformers_viscpm", {}).update(loadable)
    pipeline_loading_utils.ALL_IMPORTABLE_CLASSES.update(loadable)
    AutoConfig.register(VisCPMPaintTextEncoderConfig.model_type, VisCPMPaintTextEncoderConfig, exist_ok=True)
    AutoModel.register(VisCPMPaintTextEncoderConfig, VisCPMPaintTextEncoder, exist_ok=True)
