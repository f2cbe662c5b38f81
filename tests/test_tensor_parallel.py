"""Tensor parallelism: `from_pretrained(..., tp_plan="auto")` over 2 CPU processes (gloo) computes what one does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _repos import converted_repo
from _tp_worker import run_case
from safetensors.torch import load_file

from transformers_viscpm.models.cpmbee.configuration_cpmbee import CpmBeeConfig

WORLD_SIZE = 2


def test_the_plan_names_every_projection_and_the_position_bias():
    plan = CpmBeeConfig.base_model_tp_plan
    attention = "encoder.layers.*.self_att.self_attention"
    assert {f"{attention}.project_{name}" for name in "qkv"} <= {
        key for key, style in plan.items() if style == "colwise"
    }
    assert plan[f"{attention}.attention_out"] == plan["encoder.layers.*.ffn.ffn.w_out"] == "rowwise"
    assert plan["position_bias"] == "local_params"


@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
def test_two_processes_match_one(tmp_path_factory, tmp_path):
    cpmbee = converted_repo(tmp_path_factory, "cpmbee", remote_code=False)
    chat = converted_repo(tmp_path_factory, "viscpm_chat", remote_code=False)
    tests = Path(__file__).parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tests), os.environ.get("PYTHONPATH", "")]))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD_SIZE}"]
    command += [str(tests / "_tp_worker.py"), str(cpmbee), str(chat), str(tmp_path)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"

    expected, expected_tensors = run_case(str(cpmbee), str(chat))
    config = CpmBeeConfig.from_pretrained(cpmbee)
    inner = config.num_heads * config.dim_head
    for rank in range(WORLD_SIZE):
        results = json.loads((tmp_path / f"rank{rank}.json").read_text())
        tensors = load_file(tmp_path / f"rank{rank}.safetensors")
        for name in ("logits", "chat_logits"):
            torch.testing.assert_close(tensors[name], expected_tensors[name], atol=1e-5, rtol=0)
        for name in ("greedy", "static", "answers", "chat"):
            assert results[name] == expected[name], name
        assert (
            results["local_shapes"]["chat"]
            == results["local_shapes"]["cpmbee"]
            == {
                "project_q": [inner // WORLD_SIZE, config.dim_model],
                "attention_out": [config.dim_model, inner // WORLD_SIZE],
                "relative_attention_bias": [
                    config.position_bias_num_buckets + config.position_bias_num_segment_buckets,
                    config.num_heads // WORLD_SIZE,
                ],
                "w_out": [config.dim_model, config.dim_ff // WORLD_SIZE],
            }
        )
    assert expected["answers"][0]["<ans>"], "the tiny model answers something"
