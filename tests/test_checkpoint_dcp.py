"""Sharded (DCP) checkpoints under attack and corruption: no planted code runs, every
tensor is checksummed and each rank verifies what it reads, DCP's metadata must agree
with xform's meta.json, and every failure is one ``xf.CheckpointError`` line naming the
checkpoint, the file and the cause.

The checkpoints are real: written by two gloo processes (zero3, so each rank writes its
own shards), then tampered with here and loaded here (one process) or by the pool.
"""

from __future__ import annotations

import shutil

import pytest
import torch

import checkpoint_support as cs
import shard_support as sup
from xform.checkpoint import CheckpointError
from xform.distributed.procs import ProcessPool


@pytest.fixture(scope="module")
def pool2():
    with ProcessPool(2, timeout_s=300) as pool:
        yield pool


@pytest.fixture(scope="module")
def written(pool2, tmp_path_factory):
    """A zero3 checkpoint of two processes, and its params as loaded untampered."""
    path = tmp_path_factory.mktemp("dcp") / "ckpt"
    pool2.run(sup.phase, "zero3", str(path), 0, 1)
    return path, cs.load_params(None, str(path))


@pytest.fixture
def ckpt(written, tmp_path):
    """A fresh copy of the written checkpoint to tamper with."""
    copy = tmp_path / "ckpt"
    shutil.copytree(written[0], copy)
    return copy


def load_error(path, marker=None) -> str:
    """Loads ``path`` in this process; checks that no planted code ran (``marker`` was not
    created) and that the error is one ``CheckpointError`` line naming the checkpoint."""
    try:
        cs.load_params(None, str(path))
        error = None
    except BaseException as e:  # noqa: BLE001 - DCP raises BaseExceptions
        error = e
    assert marker is None or not marker.exists(), f"planted code ran; the load raised {error!r}"
    assert isinstance(error, CheckpointError), f"expected a CheckpointError, got {error!r}"
    message = str(error)
    assert "\n" not in message and str(path) in message, message
    return message


def test_an_untampered_sharded_checkpoint_loads(written):
    path, params = written
    assert sorted(p.name for p in (path / "dcp").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    ref, _ = sup.phase(None, None, 0, 1)
    for name in ref:
        torch.testing.assert_close(params[name], ref[name], rtol=1e-5, atol=1e-6)


# --- 1. no code from checkpoints ------------------------------------------------------------


VARIANTS = {
    # The exploit: an allowed *module* let a dotted name reach its imported `os`.
    "dotted_name_through_an_allowed_module": ("torch.distributed.checkpoint.metadata", "os.system", "touch"),
    "nested_dotted_name": ("torch.distributed.checkpoint.filesystem", "os.path.os.system", "touch"),
    # pickle.loads of a plain pickle: a second unpickler that nothing restricts.
    "pickle_loads_through_an_allowed_module": ("torch.distributed.checkpoint.filesystem", "pickle.loads", "inner"),
    "builtins_eval": ("builtins", "eval", "open"),
    "posix_system": ("posix", "system", "touch"),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_planted_code_in_dcp_metadata_never_runs(ckpt, tmp_path, variant):
    """Catches: an unpickler allow-list of modules (not classes), or one that resolves
    dotted names, running code planted in a checkpoint's ``.metadata``."""
    module, name, kind = VARIANTS[variant]
    marker = tmp_path / "code-ran"
    arg = {
        "touch": f"touch {marker}",
        "open": f"open({str(marker)!r}, 'w')",
        "inner": cs.code_pickle(marker),
    }[kind]
    (ckpt / "dcp" / ".metadata").write_bytes(cs.call_pickle(module, name, arg))
    message = load_error(ckpt, marker)
    assert "dcp/.metadata" in message and "refus" in message, message


@pytest.mark.parametrize(
    "payload, says",
    [
        (cs.call_pickle("torch.serialization", "_get_layout", "os.system('touch x')"), "not DCP metadata (KeyError"),
        (cs.call_pickle("torch", "Size", b"\x01\x02"), "holds a Size, not DCP metadata"),
    ],
    ids=["allowed-function-planted-arg", "allowed-class-not-metadata"],
)
def test_allowed_classes_with_planted_args_fail_cleanly(ckpt, payload, says):
    (ckpt / "dcp" / ".metadata").write_bytes(payload)
    message = load_error(ckpt)
    assert "dcp/.metadata" in message and says in message, message


def test_a_bytes_entry_is_refused_before_torch_unpickles_it(ckpt, tmp_path):
    """Catches: metadata made only of allowed DCP classes declaring a tensor as
    ``BytesStorageMetadata``, which DCP hands to ``torch.load(weights_only=False)``."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    marker = tmp_path / "code-ran"
    payload = cs.code_pickle(marker)
    (ckpt / "dcp" / "__9_0.distcp").write_bytes(payload)
    md = cs.read_metadata(ckpt)
    fqn = "params['0.bias']"
    (index, info), *rest = cs.storage_of(md, fqn)
    for k, _ in rest:
        del md.storage_data[k]
    md.state_dict_metadata[fqn] = BytesStorageMetadata()
    del md.storage_data[index]
    md.storage_data[type(index)(fqn)] = type(info)("__9_0.distcp", 0, len(payload))
    cs.write_metadata(ckpt, md)
    message = load_error(ckpt, marker)
    assert "dcp/.metadata" in message and fqn in message and "BytesStorageMetadata" in message, message


def test_a_storage_path_outside_the_checkpoint_is_refused(ckpt):
    """Catches: metadata whose ``relative_path`` makes DCP read a file outside the
    checkpoint (here a valid copy of the shard file, so only the path is wrong)."""
    md = cs.read_metadata(ckpt)
    shutil.copy(ckpt / "dcp" / "__0_0.distcp", ckpt.parent / "outside.distcp")
    for k, info in md.storage_data.items():
        if info.relative_path == "__0_0.distcp":
            info.relative_path = "../../outside.distcp"
    cs.write_metadata(ckpt, md)
    message = load_error(ckpt)
    assert "dcp/.metadata" in message and "../../outside.distcp" in message, message


def test_dcp_metadata_must_agree_with_meta_json(ckpt):
    """Catches: DCP metadata declaring another shape than xform's meta.json (DCP would
    read what it declares)."""
    md = cs.read_metadata(ckpt)
    fqn = "params['2.bias']"
    entry = md.state_dict_metadata[fqn]
    entry.size = torch.Size([1])
    entry.chunks = entry.chunks[:1]
    entry.chunks[0].offsets, entry.chunks[0].sizes = torch.Size([0]), torch.Size([1])
    cs.write_metadata(ckpt, md)
    message = load_error(ckpt)
    assert "dcp/.metadata" in message and fqn in message and "[1]" in message and "[3]" in message, message


# --- 2. integrity ---------------------------------------------------------------------------


def shard_file_of(ckpt, values):
    """The DCP file holding ``values``' bytes."""
    raw = values.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    found = [f for f in sorted((ckpt / "dcp").glob("*.distcp")) if raw in f.read_bytes()]
    assert len(found) == 1, found
    return found[0]


def test_a_flipped_bit_in_a_shard_file_is_detected_and_named(ckpt, written):
    """Catches: a corrupted tensor file loading silently with wrong values."""
    _, params = written
    rows = params["0.weight"][4:]  # rank 1's zero3 shard of 7 rows
    file = shard_file_of(ckpt, rows)
    cs.flip_byte_of(file, rows)
    message = load_error(ckpt)
    assert f"dcp/{file.name}" in message and "params['0.weight']" in message and "checksum" in message, message


def test_each_rank_verifies_what_it_reads(pool2, ckpt, written):
    """Loaded by two zero3 processes, the corrupt shard is read (and caught) by rank 1
    alone; both ranks fail with the same error naming the file, the tensor and rank 1."""
    _, params = written
    rows = params["0.weight"][4:]
    file = shard_file_of(ckpt, rows)
    cs.flip_byte_of(file, rows)
    errors = pool2.run(cs.load_error, "zero3", str(ckpt))
    for text in errors:
        assert text.startswith("CheckpointError: ") and "\n" not in text, text
        assert f"dcp/{file.name}" in text and "params['0.weight']" in text and "rank 1" in text, text


def test_a_truncated_shard_file_is_named(ckpt):
    """Catches: DCP's bare ``CheckpointException ranks:dict_keys([0])`` for a cut file."""
    file = ckpt / "dcp" / "__1_0.distcp"
    file.write_bytes(file.read_bytes()[:100])
    message = load_error(ckpt)
    assert "dcp/__1_0.distcp" in message and "truncated" in message, message


def test_a_missing_metadata_file_is_named(ckpt):
    (ckpt / "dcp" / ".metadata").unlink()
    message = load_error(ckpt)
    assert "dcp/.metadata" in message and "missing" in message, message


def test_garbage_metadata_is_named(ckpt):
    (ckpt / "dcp" / ".metadata").write_bytes(b"\x00" * 40)
    assert "dcp/.metadata" in load_error(ckpt)
