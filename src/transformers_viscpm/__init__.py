"""VisCPM (Chat and Paint) and CPM-Bee for transformers and diffusers.

Importing this package registers every configuration, tokenizer, model, processor and pipeline with the
transformers Auto classes and with diffusers, so that ``AutoModel.from_pretrained("openbmb/VisCPM-Chat")``
and ``DiffusionPipeline.from_pretrained("openbmb/VisCPM-Paint")`` resolve to the classes defined here.
Registration is idempotent and executes no model code.
"""

from ._registration import register_all

__version__ = "0.1.0"

register_all()
