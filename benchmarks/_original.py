"""The original VisCPM-Chat model (`VLU_CPMBee`: BEiT-3 + CPM-Bee) built from a benchmark spec, untrained.

Imported by the scripts `bench_chat.py` and `bench_train.py` run inside the reference venv (where `VisCPM` and
`original_on_cpu` import, and this project's package does not): one place for how the original is put together.
The spec holds `vision` (our BEiT-3 config fields), `llm` (the original CPM-Bee config), `text_vocab` and
`query_num`.
"""

import original_on_cpu  # noqa: F401  (patches the original to run on CPU)
import torch
from torchscale.architecture.config import EncoderConfig
from VisCPM.models import VLU_CPMBee
from VisCPM.models.beit3 import BEiT3Wrapper
from VisCPM.models.cpmbee import CPMBeeConfig, CPMBeeTorch


def original_chat_model(spec: dict) -> VLU_CPMBee:
    vision = spec["vision"]
    args = EncoderConfig(
        img_size=vision["image_size"], patch_size=vision["patch_size"], vocab_size=spec["text_vocab"], multiway=True,
        layernorm_embedding=False, normalize_output=True, no_output_layer=True, drop_path_rate=0,
        encoder_embed_dim=vision["hidden_size"], encoder_attention_heads=vision["num_attention_heads"],
        encoder_ffn_embed_dim=vision["intermediate_size"], encoder_layers=vision["num_hidden_layers"],
        checkpoint_activations=None, max_source_positions=vision["max_text_positions"],
    )  # fmt: skip
    return VLU_CPMBee(
        llm=CPMBeeTorch(CPMBeeConfig(**spec["llm"])),
        vpm=BEiT3Wrapper(args),
        vision_dim=vision["hidden_size"],
        query_num=spec["query_num"],
        device=torch.device("cpu"),
    )
