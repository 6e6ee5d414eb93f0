"""torch.compile on the tiny models, through the worker: the same images as eager, and no recompiles.

Two real Workers in-process for the whole module (compiling is minutes on a small CPU): one
eager, one with `compile=default` (regional, 64x64 warmed), each holding both families. Requests
go through `Worker.Generate` as Serve's replica drives it: the gateway's input, LoRAs resolved by
path, outputs inline (`sync_mode`); outside a replica the worker's own loader stands in for
Serve's multiplexer.
"""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from bench.worker_in_process import in_process
from core.config import Settings
from loraserve.inputs import to_input
from loraserve.v1 import worker_pb2
from serving import compiled
from serving.app import Worker
from serving.conditioning import Conditioning, ICLightSpec
from serving.metrics import WorkerMetrics
from serving.pipelines import LoadedPipeline, generate_result, load_pipeline
from serving.tiny import TinyModel, make_tiny_lora, make_tiny_model
from serving.tiny_adapters import make_tiny_ic_light
from tests.serving.serving_testkit import params, picture

SIZE = 64
# The bound for compiled vs eager images, in 0-255 levels.
MEAN_TOLERANCE = 0.5
MAX_TOLERANCE = 4
RECOMPILES = "loraserve_compile_recompiles_total"


@pytest.fixture(scope="module")
def text_loras(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """LoRAs on the text encoders as well as the U-Net: their weights change by copies too."""
    folder = tmp_path_factory.mktemp("text-loras")
    return {
        "sd15": make_tiny_lora(folder / "sd15.safetensors", "sd15", seed=7, components=["unet", "text_encoder"]),
        "sdxl": make_tiny_lora(
            folder / "sdxl.safetensors", "sdxl", seed=7, components=["unet", "text_encoder", "text_encoder_2"]
        ),
    }


@pytest.fixture(scope="module")
def workers(
    tmp_path_factory: pytest.TempPathFactory, flag_everything_checker: Path
) -> Iterator[tuple[Worker, Worker]]:
    """(eager, compiled) workers; the compiled one's inductor cache in its weights folder, as in production."""
    built = []
    for mode in (compiled.OFF, "default"):
        settings = Settings(
            data_dir=tmp_path_factory.mktemp(f"compile-{mode}"),
            device="cpu",
            compile=mode,
            compile_regional="on",
            compile_warmup_sizes=f"{SIZE}x{SIZE}",
            safety_checker_path=str(flag_everything_checker),
            allowed_local_roots=str(tmp_path_factory.getbasetemp()),
        )
        built.append(in_process(Worker(settings)))
    yield built[0], built[1]


def _models(tiny_sd15: TinyModel, tiny_sdxl: TinyModel) -> dict[str, TinyModel]:
    return {"sd15": tiny_sd15, "sdxl": tiny_sdxl}


async def _run(worker: Worker, fields: dict[str, Any]) -> list[worker_pb2.GenerateResponse]:
    inp = to_input({"prompt": "a photo of a cat", "num_inference_steps": 2, "seed": 3, "sync_mode": True,
                    "image_format": "png", "image_size": {"width": SIZE, "height": SIZE}, **fields})
    request = worker_pb2.GenerateRequest(request_id=f"r-{id(fields)}", input=inp, seed=3)
    return [event async for event in worker.Generate(request)]


def _result(events: list[worker_pb2.GenerateResponse]) -> worker_pb2.WorkerResult:
    last = events[-1]
    assert last.WhichOneof("event") == "result", last
    return last.result


def _pixels(events: list[worker_pb2.GenerateResponse]) -> np.ndarray:
    images = _result(events).output.images
    return np.stack([np.asarray(Image.open(io.BytesIO(image.file_data))) for image in images]).astype(np.int16)


def _assert_close(eager: np.ndarray, fast: np.ndarray, what: str) -> None:
    assert eager.shape == fast.shape
    difference = np.abs(eager - fast)
    assert difference.mean() <= MEAN_TOLERANCE and difference.max() <= MAX_TOLERANCE, (
        f"{what}: compiled differs from eager by mean {difference.mean():.3f}, max {difference.max()}"
    )


def _gates(worker: Worker, model: TinyModel) -> list[compiled.ShapeGate]:
    """The U-Net's and the VAE decoder's gates of the worker's pipeline of `model`."""
    (loaded,) = [loaded for loaded in worker._hot.values() if loaded.family == model.family]
    assert loaded.compiled is not None
    return loaded.compiled.gates


def _recompiles(worker: Worker) -> float | None:
    return worker._metrics.registry.get_sample_value(RECOMPILES)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
async def test_compiled_images_match_eager_and_lora_changes_never_recompile(
    family: str,
    workers: tuple[Worker, Worker],
    tiny_sd15: TinyModel,
    tiny_sdxl: TinyModel,
    text_loras: dict[str, Path],
) -> None:
    eager, fast = workers
    model = _models(tiny_sd15, tiny_sdxl)[family]
    one, other = (str(path) for path in model.lora_paths[:2])
    requests: list[tuple[str, list[dict[str, Any]]]] = [
        ("plain", []),
        ("one LoRA", [{"path": one, "scale": 1.0}]),
        ("a switch", [{"path": other, "scale": 0.8}]),
        ("a repeat", [{"path": other, "scale": 0.8}]),
        ("several LoRAs with scales, text encoders too", [{"path": one, "scale": 0.6},
                                                          {"path": str(text_loras[family]), "scale": 1.2}]),
        ("plain after LoRAs", []),
    ]
    await _run(fast, {"model_name": str(model.pipeline_dir)})  # loads (compiles) before counting
    recompiles = compiled.EVENTS.recompiles
    calls = [gate.compiled_calls for gate in _gates(fast, model)]
    for what, loras in requests:
        fields = {"model_name": str(model.pipeline_dir), "loras": loras}
        _assert_close(_pixels(await _run(eager, fields)), _pixels(await _run(fast, fields)), f"{family}, {what}")
    assert compiled.EVENTS.recompiles == recompiles
    assert _recompiles(fast) == 0
    unet, decoder = gates = _gates(fast, model)
    # The decoder's one eager call: previews fit their latent-to-RGB projection to a VAE once, on random latents.
    assert unet.eager_calls == 0 and decoder.eager_calls <= 1, "every request's call was a warmed one"
    assert all(gate.compiled_calls > before for gate, before in zip(gates, calls))


@pytest.mark.timeout(900)
async def test_an_unwarmed_size_or_batch_runs_eagerly_and_compiles_nothing(
    workers: tuple[Worker, Worker], tiny_sdxl: TinyModel
) -> None:
    eager, fast = workers
    recompiles = compiled.EVENTS.recompiles
    unwarmed: list[dict[str, Any]] = [{"image_size": {"width": 48, "height": SIZE}}, {"num_images": 2}]
    for fields in unwarmed:
        fields["model_name"] = str(tiny_sdxl.pipeline_dir)
        _assert_close(_pixels(await _run(eager, fields)), _pixels(await _run(fast, fields)), f"unwarmed {fields}")
    assert compiled.EVENTS.recompiles == recompiles and _recompiles(fast) == 0
    assert _gates(fast, tiny_sdxl)[0].eager_calls >= 2 * 2, "both requests' steps ran eagerly"


@pytest.mark.timeout(900)
async def test_previews_the_safety_checker_and_cancellation_work_compiled(
    workers: tuple[Worker, Worker], tiny_sdxl: TinyModel
) -> None:
    _, fast = workers
    model = str(tiny_sdxl.pipeline_dir)
    recompiles = compiled.EVENTS.recompiles
    events = await _run(fast, {"model_name": model, "enable_safety_checker": True})
    assert list(_result(events).output.has_nsfw_concepts) == [True]
    previews = [e.progress.preview_jpeg for e in events if e.WhichOneof("event") == "progress"]
    assert previews and previews[-1][:2] == b"\xff\xd8", "the last step's preview, a JPEG"

    # Cancelled (the caller gone) at its first step: the worker stops at a step boundary and the
    # next request on the compiled pipeline is the plain model's, with nothing recompiled.
    plain = _pixels(await _run(fast, {"model_name": model}))
    inp = to_input({"model_name": model, "prompt": "a photo of a cat", "num_inference_steps": 50, "seed": 3,
                    "loras": [{"path": str(tiny_sdxl.lora_paths[0]), "scale": 1.0}],
                    "image_size": {"width": SIZE, "height": SIZE}})
    request = worker_pb2.GenerateRequest(request_id="cancelled", input=inp, seed=3)
    steps: list[int] = []
    denoising = asyncio.Event()

    async def consume() -> None:
        async for event in fast.Generate(request):
            if event.WhichOneof("event") == "progress":
                steps.append(event.progress.step)
                denoising.set()

    call = asyncio.ensure_future(consume())
    await asyncio.wait_for(denoising.wait(), 600)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert 0 < steps[-1] < 50
    assert np.array_equal(_pixels(await _run(fast, {"model_name": model})), plain)
    assert compiled.EVENTS.recompiles == recompiles and _recompiles(fast) == 0


def _weights(loaded: LoadedPipeline) -> dict[str, torch.nn.Parameter]:
    pipe = loaded.pipe
    modules = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    if getattr(pipe, "text_encoder_2", None) is not None:
        modules["text_encoder_2"] = pipe.text_encoder_2
    return {f"{name}.{key}": p for name, module in modules.items() for key, p in module.named_parameters()}


def test_loras_and_ic_light_write_into_the_modules_own_weight_tensors(
    tiny_sd15: TinyModel, tiny_sdxl: TinyModel, text_loras: dict[str, Path], tmp_path: Path
) -> None:
    """A compiled, CUDA-graphed model reads the tensors it was built on: no parameter may be replaced.

    Checked on eager pipelines (the same code runs under a compiled one): during a request with
    LoRAs on the U-Net and text encoders, and one with IC-Light's offsets (whose 8-channel conv_in
    alone is replaced, for a call that runs eagerly), every other parameter is the same tensor.
    """
    ic_light = make_tiny_ic_light(tmp_path / "ic.safetensors", tiny_sd15.pipeline_dir, seed=1)
    for model in (tiny_sd15, tiny_sdxl):
        loaded = load_pipeline(str(model.pipeline_dir))
        before = _weights(loaded)
        values = {name: p.detach().clone() for name, p in before.items()}
        pointers = {name: p.data_ptr() for name, p in before.items()}
        requests: list[dict[str, Any]] = [
            {"loras": [(str(model.lora_paths[0]), 1.0), (str(text_loras[model.family]), 0.5)]},
            {"loras": [(str(text_loras[model.family]), 0.8)]},
        ]
        if model.family == "sd15":
            spec = ICLightSpec(model_url="ic", image_url="fg", weights=ic_light, image=picture(3))
            requests.append({"conditioning": Conditioning(ic_light=spec)})
        for overrides in requests:
            seen: list[tuple[set[str], set[str], set[str]]] = []

            def look(_step: int, _steps: int) -> None:
                during = _weights(loaded)
                replaced = {name for name in before if during[name] is not before[name]}
                moved = {name for name in before if during[name].data_ptr() != pointers[name]}
                changed = {n.partition(".")[0] for n in before if not torch.equal(during[n], values[n])}
                seen.append((replaced, moved, changed))

            generate_result(loaded, params(**overrides), on_step=look)
            replaced, moved, changed = seen[0]
            expected = {"unet.conv_in.weight"} if "conditioning" in overrides else set()
            assert replaced == moved == expected, f"{model.family} {overrides}: replaced {sorted(replaced)[:3]}"
            assert "unet" in changed, f"only {changed} changed"
            after = _weights(loaded)
            assert all(after[n] is before[n] for n in before), f"{model.family} {overrides}: a parameter replaced"
        # A LoRA set stays installed until a request without it.
        generate_result(loaded, params())
        after = _weights(loaded)
        assert all(after[n] is before[n] and torch.equal(after[n], values[n]) for n in before), "weights back"


def test_a_compile_after_warm_up_is_counted_and_logged_with_its_reason(caplog: pytest.LogCaptureFixture) -> None:
    """What the worker's `loraserve_compile_recompiles_total` counts: any compile once warm-up ended."""
    compiled.EVENTS.install()
    metrics = WorkerMetrics()
    compiled.EVENTS.add_listener(lambda _reason: metrics.compile_recompiles.inc())
    doubled = torch.compile(lambda x: x * 2, backend="eager", dynamic=False)
    with compiled.EVENTS.warming():
        doubled(torch.ones(2))
    assert metrics.registry.get_sample_value(RECOMPILES) == 0
    with caplog.at_level(logging.WARNING, logger=compiled.__name__):
        doubled(torch.ones(3))
    assert metrics.registry.get_sample_value(RECOMPILES) == 1
    assert any("size mismatch" in record.getMessage() for record in caplog.records), caplog.text


def test_settings_parse_and_refuse() -> None:
    assert compiled.resolve_mode("auto", "cuda") == "max-autotune"
    assert compiled.resolve_mode("auto", "cpu") == compiled.OFF
    assert compiled.parse_sizes(" 1024x1024, 832X1216 ") == [(1024, 1024), (832, 1216)]
    with pytest.raises(ValueError, match="compile must be one of"):
        compiled.resolve_mode("fast", "cpu")
    with pytest.raises(ValueError, match="compile_warmup_sizes: '1000x7'"):
        compiled.parse_sizes("1000x7")
    assert [compiled.resolve_regional(value) for value in ("auto", "on", "off")] == [None, True, False]
    with pytest.raises(ValueError, match="compile_regional must be one of auto, on, off, got 'true'"):
        compiled.resolve_regional("true")


def test_a_dedicated_inpainting_checkpoint_is_warmed_through_its_inpaint_pipeline(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Its U-Net takes 9 channels: a text-to-image warm-up call would fail, and warm nothing requests use."""
    model = make_tiny_model(tmp_path_factory.mktemp("tiny-inpaint"), "sd15", num_loras=0, inpaint=True)
    loaded = load_pipeline(str(model.pipeline_dir))
    channels: list[int] = []
    hook = loaded.pipe.unet.register_forward_pre_hook(lambda _m, args: channels.append(args[0].shape[1]))
    try:
        with torch.no_grad():
            compiled.warm_up(loaded.pipe, SIZE, SIZE)
    finally:
        hook.remove()
    assert channels == [9] * compiled.WARMUP_STEPS
