"""Textual-inversion files as users have them, read by `sd15.conditioning.embeddings` (formats and
refusals; the vectors' effect on the text states is test_conditioning_parity.py)."""

import hashlib
import logging

import pytest
import torch
from safetensors.torch import save_file

from sd15 import CheckpointError
from sd15.conditioning.embeddings import Embeddings, read_embedding
from sd15.conditioning.tokenizer import CLIPTokenizer


def vectors(n=2, width=768, seed=0):
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


def test_the_original_ldm_format_pickles_a_parameter_dict(tmp_path):
    """Very old embeddings pickle `string_to_param` as a torch.nn.ParameterDict: its parameters are read
    without building (or running) the module."""
    params = torch.nn.ParameterDict({"*": torch.nn.Parameter(vectors(3))})
    path = tmp_path / "oldstyle.pt"
    torch.save({"string_to_token": {"*": 265}, "string_to_param": params, "name": "x", "step": 500}, path)
    e = read_embedding(path)
    assert e.name == "oldstyle" and torch.equal(e.vectors, vectors(3))
    assert e.hash == hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def test_the_trigger_is_the_file_name_not_the_stored_name(tmp_path):
    path = tmp_path / "EasyNegative.pt"
    torch.save({"string_to_param": {"*": vectors(1)}, "name": "something else"}, path)
    assert read_embedding(path).name == "EasyNegative"


def test_an_sdxl_pair_gives_its_clip_l_half(tmp_path):
    save_file({"clip_l": vectors(2), "clip_g": vectors(2, 1280)}, str(tmp_path / "pair.safetensors"))
    assert torch.equal(read_embedding(tmp_path / "pair.safetensors").vectors, vectors(2))


def test_a_folder_loads_what_it_can_and_names_the_rest(tmp_path, caplog):
    (tmp_path / "sub").mkdir()
    save_file({"emb_params": vectors(2)}, str(tmp_path / "sub" / "good.safetensors"))
    save_file({"emb_params": vectors(2, 1024)}, str(tmp_path / "sd2.safetensors"))
    (tmp_path / "broken.pt").write_bytes(b"not a pickle at all")
    (tmp_path / "notes.txt").write_text("ignored: not an embedding extension")
    library = Embeddings(CLIPTokenizer())
    with caplog.at_level(logging.WARNING, "sd15"):
        skipped = library.add_dir(tmp_path)
    assert library.names() == ["good"]
    reasons = {p.name: why for p, why in skipped}
    assert set(reasons) == {"sd2.safetensors", "broken.pt"} and "SD 2.x" in reasons["sd2.safetensors"]
    assert sum("embedding skipped" in r.getMessage() for r in caplog.records) == 2
    with pytest.raises(ValueError, match="does not exist"):
        library.add_dir(tmp_path / "missing")


@pytest.mark.parametrize("content,message", [
    ({"emb_params": vectors(2, 1280)}, "SDXL"),
    ({"emb_params": torch.full((2, 768), float("nan"))}, "NaN"),
    ({"a": vectors(1), "b": vectors(1)}, "not a textual-inversion embedding"),
    ({"emb_params": torch.zeros(0, 768)}, "0 vectors"),
    ({"emb_params": torch.zeros(2, 3, 768)}, "shape"),
])
def test_files_that_are_not_sd1_embeddings_are_refused(tmp_path, content, message):
    save_file(content, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError, match=message):
        read_embedding(tmp_path / "bad.safetensors")


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            import os
            return os.system, (f"touch {marker}",)
    path = tmp_path / "evil.pt"
    torch.save({"string_to_param": {"*": vectors(1)}, "extra": Payload()}, path)
    with pytest.raises(CheckpointError, match="refusing to load.*os.system|posix.system"):
        read_embedding(path)
    assert not marker.exists()


def test_a_parameter_dict_with_other_than_string_keys_gives_nothing(tmp_path):
    """The placeholder keeps string keys only (turning other objects into text could cost what a tiny
    pickle cannot): such a file holds no term."""
    params = torch.nn.ParameterDict({"*": torch.nn.Parameter(vectors(1))})
    params._parameters = {("x",) * 3: params._parameters["*"]}
    path = tmp_path / "oddkeys.pt"
    torch.save({"string_to_param": params}, path)
    with pytest.raises(CheckpointError, match="holds 0 terms"):
        read_embedding(path)


def test_the_library_checks_what_it_is_given_and_replaces_by_name():
    from sd15.conditioning.embeddings import Embedding
    library = Embeddings(CLIPTokenizer())
    with pytest.raises(ValueError, match="80 vectors"):
        library.add(Embedding("big", vectors(80), "0" * 12))
    with pytest.raises(ValueError, match=r"shape \(2, 32\)"):
        library.add(Embedding("narrow", vectors(2, 32), "0" * 12))
    first, second = Embedding("style", vectors(1), "a" * 12), Embedding("style", vectors(2), "b" * 12)
    table = library.table()
    library.add(first)
    library.add(second)
    assert library["style"] is second and len(library) == 1
    tokens = CLIPTokenizer().encode("style")
    assert library.match(tokens, 0) == (second, len(tokens))
    assert not table and table.match(tokens, 0) is None          # a table taken earlier never changes
