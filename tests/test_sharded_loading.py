"""Sharded loading builds each leaf as a global array from the shards a process holds.

Two processes of 4 CPU devices each form one 2x2x2 mesh ("data" spans the processes),
so every property is checked where it matters: each process reads from disk only the
checkpoint rows its own devices hold, each of those rows once, and its shards are bit
for bit the slices of the unsharded load.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from jft.errors import JftError
from jft.formats.gguf_file import GGUFFile
from jft.formats.loading import load_checkpoint
from jft.formats.safetensors_io import SafetensorsFile
from jft.models import PARAM_AXES, ModelConfig, RopeConfig, RuntimePolicy, param_shapes
from jft.models.tensor_names import TOP_LEVEL, layer_sources
from tests.gguf_writer import quantize, write_gguf
from tests.hf_reference import make_hf_model, save_hf_model

SCRIPT = textwrap.dedent(
    """
    import builtins, json, sys
    from pathlib import Path
    import jax, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    process, port, models = int(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process,
                               initialization_timeout=60)
    import jft.formats.gguf_file, jft.formats.safetensors_io
    from jft.formats.loading import load_checkpoint
    from jft.formats.gguf_file import GGUFFile
    from jft.models import PARAM_AXES
    from jft.formats.safetensors_io import SafetensorsFile

    reads = []  # (file, offset, bytes) of every tensor read

    class CountedFile:
        def __init__(self, path, mode):
            self.path, self.file = str(path), builtins.open(path, mode)
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            self.file.close()
        def readinto(self, buffer):
            offset = self.file.tell()
            count = self.file.readinto(buffer)
            reads.append((self.path, offset, count))
            return count
        def __getattr__(self, name):
            return getattr(self.file, name)

    jft.formats.safetensors_io.open = jft.formats.gguf_file.open = CountedFile

    mesh = Mesh(np.array(jax.devices()).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    RULES = {"embed": "fsdp", "heads": "tensor", "kv_heads": "tensor", "mlp": "tensor",
             "vocab": "tensor"}

    def by_rules(path, shape):
        axes = [RULES.get(name) for name in PARAM_AXES[path[-1]]]
        return NamedSharding(mesh, P(*(axis if axis and size % mesh.shape[axis] == 0 else None
                                       for axis, size in zip(axes, shape))))

    # Split over the processes along each checkpoint's row axis (gate_proj: its columns).
    ROWS_OVER_DATA = {"embed": P("data", None), "attn_norm": P(None, "data"),
                      "q_proj": P(None, None, "data", None), "o_proj": P(None, None, None, "data"),
                      "down_proj": P(None, None, "data"), "gate_proj": P(None, "data", None)}

    def rows_over_data(path, shape):
        return NamedSharding(mesh, ROWS_OVER_DATA.get(path[-1], P()))

    def tensor_extents(path):
        if path.endswith(".gguf"):
            tensors = GGUFFile(path).tensors
            return {n: (path, t.start, t.start + t.nbytes) for n, t in tensors.items()}
        return {n: (str(f), t.start, t.end) for f in Path(path).glob("*.safetensors")
                for n, t in SafetensorsFile(f).tensors.items()}

    def shard_shape(spec, shape):
        out = []
        for size, axes in zip(shape, tuple(spec) + (None,) * len(shape)):
            axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
            out.append(size // int(np.prod([mesh.shape[a] for a in axes])))
        return tuple(out)

    def check(path, dtype, sharding):
        reference = load_checkpoint(path, dtype).params
        reads.clear()
        params = load_checkpoint(path, dtype, sharding=sharding).params
        flat = lambda tree: {tuple(k.key for k in p): x
                             for p, x in jax.tree.flatten_with_path(tree)[0]}
        expected, actual = flat(reference), flat(params)
        problems = [] if set(expected) == set(actual) else [f"leaves {sorted(actual)}"]
        for key, want in expected.items():
            leaf, target = actual[key], sharding(key, want.shape)
            if (leaf.shape, leaf.dtype, leaf.sharding) != (want.shape, want.dtype, target):
                problems.append(f"{key}: {leaf.shape} {leaf.dtype} {leaf.sharding}")
            if {s.device for s in leaf.addressable_shards} != set(jax.local_devices()):
                problems.append(f"{key}: shards on {leaf.addressable_shards}")
            full = np.asarray(want)
            for shard in leaf.addressable_shards:
                data = np.asarray(shard.data)
                if data.shape != shard_shape(target.spec, want.shape):
                    problems.append(f"{key}: shard of shape {data.shape}")
                elif data.tobytes() != full[shard.index].tobytes():
                    problems.append(f"{key}: shard {shard.index} differs")
        extents = tensor_extents(path)
        read, size = {}, {n: end - start for n, (_, start, end) in extents.items()}
        for file, offset, count in reads:
            name = next(n for n, (f, start, end) in extents.items()
                        if f == file and start <= offset and offset + count <= end)
            read[name] = read.get(name, 0) + count
        return {"problems": problems, "read": read, "size": size}

    report = {}
    for name, path in models.items():
        report[name] = check(path, "float32", by_rules)
    for name in ("llama", "llama-q8_0.gguf"):
        report[name + " bfloat16"] = check(models[name], "bfloat16", by_rules)
        report[name + " rows over data"] = check(models[name], "float32", rows_over_data)
    jax.distributed.shutdown()
    print(json.dumps(report))
    """
)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    save_hf_model("llama", root / "llama")
    save_hf_model("qwen2", root / "qwen2")  # q/k/v biases, tied head
    # q/k/v/o and MLP biases, in several files with an index
    make_hf_model("llama3").save_pretrained(root / "llama3", max_shard_size="100KB")
    # llama.cpp's rotary q/k row order; Q8_0 blocks of 32 fill these rows of 64 and 96
    write_gguf(make_hf_model("llama"), root / "llama-q8_0.gguf", "llama", Q.Q8_0)
    write_gguf(make_hf_model("gemma3"), root / "gemma3.gguf", "gemma3")  # norms as 1 + w
    assert len(list((root / "llama3").glob("model-*-of-*.safetensors"))) > 1
    return {name: str(root / name) for name in
            ("llama", "qwen2", "llama3", "llama-q8_0.gguf", "gemma3.gguf")}


@pytest.fixture(scope="module")
def reports(checkpoints) -> list[dict]:
    """Each process's report: per load, the problems found and bytes read per tensor."""
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        port = str(probe.getsockname()[1])
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    processes = [
        subprocess.Popen([sys.executable, "-c", SCRIPT, str(i), port, json.dumps(checkpoints)],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    outputs = []
    try:
        for process in processes:
            out, err = process.communicate(timeout=300)
            assert process.returncode == 0, err[-3000:]
            outputs.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for process in processes:
            process.kill()
    return outputs


@pytest.mark.parametrize("model", ["llama", "qwen2", "llama3"])
def test_hf_checkpoint_loads_sharded_bit_identical(reports, model):
    for report in reports:
        assert report[model]["problems"] == []


@pytest.mark.parametrize("model", ["llama-q8_0.gguf", "gemma3.gguf"])
def test_gguf_file_loads_sharded_bit_identical(reports, model):
    for report in reports:
        assert report[model]["problems"] == []


@pytest.mark.parametrize("model", ["llama", "llama-q8_0.gguf"])
def test_bfloat16_loads_sharded_bit_identical(reports, model):
    for report in reports:
        assert report[model + " bfloat16"]["problems"] == []


@pytest.mark.parametrize("model", ["llama", "qwen2", "llama3", "llama-q8_0.gguf", "gemma3.gguf"])
def test_each_process_reads_every_tensor_exactly_once(reports, model):
    # A process's devices along "tensor" hold the same norm shards, and the "fsdp" split
    # of q/k/v/gate/up falls on checkpoint columns, yet each byte is read once.
    for report in reports:
        assert report[model]["read"] == report[model]["size"]


@pytest.mark.parametrize("model", ["llama", "llama-q8_0.gguf"])
def test_each_process_reads_only_the_rows_of_its_shards(reports, model):
    # ROWS_OVER_DATA splits these tensors' checkpoint rows between the processes; it
    # splits gate_proj's checkpoint columns, and rows are read whole.
    halved = ("token_embd", "attn_q.", "attn_output", "ffn_down", "attn_norm", "embed_tokens",
              "q_proj", "o_proj", "down_proj", "input_layernorm")
    for report in reports:
        loaded = report[model + " rows over data"]
        assert loaded["problems"] == []
        for name, size in loaded["size"].items():
            expected = size // 2 if any(part in name for part in halved) else size
            assert loaded["read"][name] == expected, name


# ---------------------------------------------------------------- in this process

CONFIG = ModelConfig(family="llama", vocab_size=12, embed_dim=10, num_layers=1, num_heads=4,
                     num_kv_heads=2, head_dim=6, mlp_dim=14, norm_eps=1e-6, rope=RopeConfig(),
                     layer_types=("full",), qkv_bias=True, o_bias=True,
                     mlp_bias=True, qk_norm=True, post_norms=True,
                     policy=RuntimePolicy(dtype="float32"),
)


def test_layout_maps_any_jft_part_onto_the_checkpoint_block_holding_it():
    rng = np.random.default_rng(0)
    shapes = param_shapes(CONFIG)
    sources = [(TOP_LEVEL[key], shapes[key], PARAM_AXES[key]) for key in shapes if key != "layers"]
    sources += [(source, shapes["layers"][key][1:], PARAM_AXES[key][1:])
                for key, source in layer_sources(CONFIG).items()]
    assert len(sources) == 3 + 20
    for source, shape, axes in sources:
        layout = source.layout
        assert layout.jft == axes
        weights = rng.standard_normal(layout.checkpoint_shape(shape))
        full = source.to_jft(weights, CONFIG)
        assert full.shape == shape
        np.testing.assert_array_equal(source.from_jft(full, CONFIG), weights)
        for _ in range(20):
            part = []
            for size in shape:
                start = int(rng.integers(0, size))
                part.append((start, int(rng.integers(start + 1, size + 1))))
            ranges = layout.checkpoint_ranges(tuple(part), CONFIG)
            block = weights[tuple(slice(*r) for r in ranges)]
            np.testing.assert_array_equal(layout.to_jft(block, CONFIG, tuple(part)),
                                          full[tuple(slice(*p) for p in part)])


def test_readers_return_only_the_requested_rows_and_columns(tmp_path):
    import gguf
    from safetensors.numpy import save_file

    rng = np.random.default_rng(1)
    weights = rng.standard_normal((12, 64)).astype(np.float32)
    save_file({"w": weights, "v": weights[0]}, tmp_path / "model.safetensors")
    stored = SafetensorsFile(tmp_path / "model.safetensors")
    np.testing.assert_array_equal(stored.read("w", rows=(3, 9), columns=(5, 40)),
                                  weights[3:9, 5:40])
    np.testing.assert_array_equal(stored.read("v", rows=(7, 30)), weights[0, 7:30])

    writer = gguf.GGUFWriter(str(tmp_path / "model.gguf"), "llama")
    writer.add_tensor("w", quantize(weights, Q.Q8_0), raw_dtype=Q.Q8_0)
    writer.add_tensor("v", quantize(weights[0], Q.Q8_0), raw_dtype=Q.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    stored = GGUFFile(tmp_path / "model.gguf")
    decoded, vector = stored.read("w"), stored.read("v")
    assert np.abs(decoded - weights).max() < 0.05  # Q8_0 error
    np.testing.assert_array_equal(stored.read("w", rows=(3, 9), columns=(5, 40)),
                                  decoded[3:9, 5:40])
    # A vector's rows are its values: only the blocks of 32 holding them are decoded.
    np.testing.assert_array_equal(stored.read("v", rows=(35, 50)), vector[35:50])
    np.testing.assert_array_equal(stored.read("v", rows=(7, 64)), vector[7:64])


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama")
    save_hf_model("llama", directory)
    return directory


def _one_device_sharding(path, shape):
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    return NamedSharding(Mesh(np.array(jax.devices()[:1]), ("fsdp",)), PartitionSpec())


def test_sharded_load_of_a_missing_tensor_names_the_directory_and_tensor(llama_dir, tmp_path):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(llama_dir / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_bytes((llama_dir / "config.json").read_bytes())
    with pytest.raises(JftError, match=r"model\.layers\.1\.mlp\.down_proj\.weight.* missing"):
        load_checkpoint(tmp_path, sharding=_one_device_sharding)


def test_sharded_load_of_a_tensor_of_the_wrong_shape_names_file_and_tensor(llama_dir, tmp_path):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(llama_dir / "model.safetensors")
    name = "model.layers.2.mlp.down_proj.weight"
    tensors[name] = tensors[name].T.copy()  # [in, out]: the right size, the wrong layout
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_bytes((llama_dir / "config.json").read_bytes())
    with pytest.raises(JftError, match=rf"model\.safetensors: tensor '{name}' has shape"):
        load_checkpoint(tmp_path, sharding=_one_device_sharding)


def test_sharded_load_of_a_truncated_file_names_it(llama_dir, tmp_path):
    weights = (llama_dir / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(weights[:-1000])
    (tmp_path / "config.json").write_bytes((llama_dir / "config.json").read_bytes())
    with pytest.raises(JftError, match=r"model\.safetensors: file is truncated \(tensor"):
        load_checkpoint(tmp_path, sharding=_one_device_sharding)
