"""Meta checkpoint folders against Meta's reference model (llama_models.llama3.model, llama-models
0.3.0, with fairscale on a single-process gloo group), on random weights at several configs."""

import json
import os

import pytest
import torch

import plainllama
from helpers import CONFIGS, IDS, LLAMA3_VOCAB, oracle
from meta_files import llama3_tokenizer_model, reference_logits, reference_model, write_meta_checkpoint
from plainllama import PlainLlamaError

oracle("llama_models")
oracle("fairscale")


@pytest.fixture(scope="module")
def references():
    return {
        name: reference_model(params, LLAMA3_VOCAB, theta, seed=i)
        for i, (name, (params, theta)) in enumerate(CONFIGS.items())
    }


@pytest.mark.parametrize("config", list(CONFIGS))
def test_logits_match_meta_reference(tmp_path, references, config):
    params, _ = CONFIGS[config]
    ref = references[config]
    folder = write_meta_checkpoint(tmp_path / config, params, ref.state_dict(), llama3_tokenizer_model())
    # The reference computes in float32 from the same bfloat16 weights the file holds.
    ref.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in ref.state_dict().items()})
    ours = plainllama.load(str(folder), device="cpu", dtype="float32")
    torch.testing.assert_close(ours.logits(IDS), reference_logits(ref, IDS), atol=1e-4, rtol=1e-4)


def test_tied_embeddings_match_meta_reference(tmp_path, references):
    params, _ = CONFIGS["llama3.1"]
    ref = references["llama3.1"]
    state = {k: v.to(torch.bfloat16).float() for k, v in ref.state_dict().items()}
    state["output.weight"] = state["tok_embeddings.weight"]  # Llama 3.2 1B/3B share the matrix
    ref.load_state_dict(state)
    folder = write_meta_checkpoint(tmp_path / "tied", params, state, llama3_tokenizer_model(), tied=True)
    ours = plainllama.load(str(folder), device="cpu", dtype="float32")
    assert ours.args.tie_embeddings
    torch.testing.assert_close(ours.logits(IDS), reference_logits(ref, IDS), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("n_shards, embedding_axis", [(2, 0), (4, 0), (2, 1), (4, 1)])
def test_model_parallel_shards_equal_one_shard(tmp_path, references, n_shards, embedding_axis):
    """Llama 3 cuts the embedding along the vocabulary (axis 0), Llama 1/2 along its width (axis 1)."""
    params, _ = CONFIGS["llama3.1"]
    state = references["llama3.1"].state_dict()
    one = plainllama.load(
        str(write_meta_checkpoint(tmp_path / "one", params, state, llama3_tokenizer_model())), device="cpu"
    )
    many = plainllama.load(
        str(
            write_meta_checkpoint(tmp_path / "many", params, state, llama3_tokenizer_model(), n_shards, embedding_axis)
        ),
        device="cpu",
    )
    assert torch.equal(one.logits(IDS), many.logits(IDS))


# --- bad input: one clear error naming the file, nothing half-loaded ---


@pytest.fixture
def good_folder(tmp_path, references):
    params, _ = CONFIGS["llama3.1"]
    return write_meta_checkpoint(
        tmp_path / "good", params, references["llama3.1"].state_dict(), llama3_tokenizer_model(), n_shards=2
    )


def load_error(folder) -> str:
    with pytest.raises(PlainLlamaError) as e:
        plainllama.load(str(folder), device="cpu")
    return str(e.value)


def test_missing_shard(good_folder):
    os.rename(os.path.join(good_folder, "consolidated.01.pth"), os.path.join(good_folder, "consolidated.02.pth"))
    assert "consolidated.01.pth" in load_error(good_folder)


def test_shards_of_mixed_sizes(good_folder, tmp_path, references):
    other, _ = CONFIGS["llama2"]
    small = write_meta_checkpoint(
        tmp_path / "small", other, references["llama2"].state_dict(), llama3_tokenizer_model(), n_shards=2
    )
    os.replace(os.path.join(small, "consolidated.01.pth"), os.path.join(good_folder, "consolidated.01.pth"))
    assert "shards of different models" in load_error(good_folder)


def test_params_not_json(good_folder):
    with open(os.path.join(good_folder, "params.json"), "w") as f:
        f.write("{ dim: 128, oops")
    message = load_error(good_folder)
    assert "params.json" in message and "not valid JSON" in message


def test_params_disagree_with_tensors(good_folder):
    path = os.path.join(good_folder, "params.json")
    params = json.load(open(path))
    params["n_layers"] = 3
    json.dump(params, open(path, "w"))
    assert "n_layers is 3, but the shards hold 2 layers" in load_error(good_folder)


def test_unknown_params_key_is_reported(good_folder, caplog):
    path = os.path.join(good_folder, "params.json")
    params = json.load(open(path))
    params["attention_sink_size"] = 4
    json.dump(params, open(path, "w"))
    with caplog.at_level("WARNING", logger="plainllama"):
        plainllama.load(str(good_folder), device="cpu")
    assert "attention_sink_size" in caplog.text


def test_vision_model_is_refused(good_folder):
    path = os.path.join(good_folder, "params.json")
    params = json.load(open(path))
    params["vision_chunk_size"] = 560
    json.dump(params, open(path, "w"))
    assert "vision" in load_error(good_folder)


class RunsCodeWhenUnpickled:
    def __reduce__(self):
        return (os.system, ("echo this would run on load",))


def test_pickled_objects_are_refused(good_folder):
    # A .pth whose pickle would call os.system: torch.load(weights_only=True) refuses to build it.
    torch.save(
        {"tok_embeddings.weight": torch.zeros(2), "payload": RunsCodeWhenUnpickled()},
        os.path.join(good_folder, "consolidated.00.pth"),
    )
    message = load_error(good_folder)
    assert "consolidated.00.pth" in message and "weights_only=True" in message


def test_truncated_shard(good_folder):
    path = os.path.join(good_folder, "consolidated.00.pth")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    message = load_error(good_folder)
    assert "consolidated.00.pth" in message and "corrupt" in message


def test_tokenizer_model_of_neither_format(good_folder):
    os.remove(os.path.join(good_folder, "tokenizer.model"))
    with open(os.path.join(good_folder, "tokenizer.model"), "w") as f:
        f.write("<html>not a tokenizer</html>")
    assert "neither a Llama 3 tokenizer" in load_error(good_folder)
