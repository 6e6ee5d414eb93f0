"""A FLUX.1 base as one .safetensors file in BFL's layout (how flux1-dev.safetensors and most shared
fine-tunes ship): loaded by the real loader with its other parts from `flux_single_file_config`, it
generates exactly what the diffusers folder it was written from does, LoRAs included, as does a
transformer saved in diffusers' own names, and a real worker serves it with the settings as an operator
writes them. The family of any single file comes from diffusers' inference on its tensor names; SD
files keep their pipelines."""

from __future__ import annotations

import functools
import shutil
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

from bench.worker_in_process import in_process
from core.config import Settings
from loraserve.errors import ErrorType
from loraserve.inputs import to_input
from loraserve.v1 import flux_pb2, worker_pb2
from serving import flux_checkpoint, flux_generation, loading
from serving.app import Worker
from serving.errors import ModelLoadError
from serving.pipelines import LoadedPipeline, load_pipeline
from serving.tiny import TinyModel
from serving.tiny_flux import ALL_IN_ONE_T5_PREFIX, SINGLE_FILE_NAME, save_flux_all_in_one
from storage.fetch import FetchPolicy
from storage.weights import WeightsCache

SIZE = 32
# FLUX.1's width and single-block MLP width: diffusers' converter splits `linear1` at these.
FLUX1_WIDTH, FLUX1_MLP = 3072, 12288
SD_UNET = "model.diffusion_model."


def params(lora: Path | None = None) -> flux_generation.FluxParams:
    inp = flux_pb2.FluxInput(prompt="a cat", num_inference_steps=2, enable_safety_checker=False)
    inp.image_size.custom.width = inp.image_size.custom.height = SIZE
    request = flux_generation.flux_params(inp, seed=1)
    request.loras = [(str(lora), 1.0)] if lora else []
    return request


def pixels(loaded: LoadedPipeline, request: flux_generation.FluxParams) -> np.ndarray:
    return np.asarray(flux_generation.generate_flux(loaded, request).images[0])


def load_single_file(path: Path, tiny_flux: TinyModel) -> LoadedPipeline:
    return load_pipeline(str(path), flux_single_file_config=str(tiny_flux.pipeline_dir))


def bfl_tensors(tiny_flux: TinyModel) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(tiny_flux.pipeline_dir.parent / SINGLE_FILE_NAME))


def write(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    safetensors.torch.save_file({name: tensor.clone() for name, tensor in tensors.items()}, str(path))
    return path


def test_a_bfl_single_file_generates_the_folders_pixels_with_and_without_a_lora(
    tiny_flux: TinyModel, tmp_path: Path
) -> None:
    folder = load_pipeline(str(tiny_flux.pipeline_dir))
    single = load_single_file(tiny_flux.pipeline_dir.parent / SINGLE_FILE_NAME, tiny_flux)
    assert single.family == "flux"
    plain = pixels(folder, params())
    np.testing.assert_array_equal(pixels(single, params()), plain)
    lora = tiny_flux.lora_paths[0]
    with_lora = pixels(single, params(lora))
    assert not np.array_equal(with_lora, plain)
    np.testing.assert_array_equal(with_lora, pixels(folder, params(lora)))
    # The comparison sees a layout slip: the final modulation in diffusers' (scale, shift) order, unswapped.
    tensors = bfl_tensors(tiny_flux)
    for kind in ("weight", "bias"):
        shift, scale = tensors[f"final_layer.adaLN_modulation.1.{kind}"].chunk(2)
        tensors[f"final_layer.adaLN_modulation.1.{kind}"] = torch.cat([scale, shift])
    unswapped = load_single_file(write(tmp_path / "unswapped.safetensors", tensors), tiny_flux)
    assert not np.array_equal(pixels(unswapped, params()), plain)


async def worker_events(
    tmp_path_factory: pytest.TempPathFactory, flux_model: Path, flux_single_file_config: str = ""
) -> list[worker_pb2.GenerateResponse]:
    """One fal-ai/flux-lora request through a real Worker (in process, as tests/serving/test_residency.py's)."""
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("single-file-worker"),
        device="cpu",
        flux_model=str(flux_model),
        flux_single_file_config=flux_single_file_config,
        allowed_local_roots=str(tmp_path_factory.getbasetemp()),
    )
    fields = {"prompt": "a cat", "image_size": {"width": SIZE, "height": SIZE}, "num_inference_steps": 2,
              "enable_safety_checker": False, "sync_mode": True, "image_format": "png"}
    request = worker_pb2.GenerateRequest(request_id="flux", flux_input=to_input(fields, "fal-ai/flux-lora"), seed=1)
    return [event async for event in in_process(Worker(settings)).Generate(request)]


async def test_the_worker_serves_a_single_file_flux_model_with_its_config_setting(
    tiny_flux: TinyModel, tiny_sd15: TinyModel, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    """The settings as an operator writes them: `flux_model` the file (through the worker's weights cache),
    `flux_single_file_config` the diffusers folder; a config that is no FLUX.1 checkpoint is the operator's
    error, named by its setting, not an internal one."""
    single = tiny_flux.pipeline_dir.parent / SINGLE_FILE_NAME
    images = []
    for flux_model, config in ((tiny_flux.pipeline_dir, ""), (single, str(tiny_flux.pipeline_dir))):
        events = await worker_events(tmp_path_factory, flux_model, config)
        assert events[-1].WhichOneof("event") == "result", events[-1]
        images.append(events[-1].result.output.images[0].file_data)
    assert images[0] == images[1]
    refused = {tiny_sd15.pipeline_dir: "it has none that can be read", tmp_path / "FLUX.1-dev": "local path does not"}
    for config, reason in refused.items():
        failure = (await worker_events(tmp_path_factory, single, str(config)))[-1]
        assert failure.WhichOneof("event") == "failure", failure
        assert failure.failure.type == ErrorType.MODEL_LOAD_FAILED, failure.failure
        expected = f"{SINGLE_FILE_NAME}' takes its transformer config from '{config}' (setting flux_single_file_config)"
        assert f"{expected}: {reason}" in failure.failure.message, failure.failure.message


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A folder served over HTTP on loopback, and its URL."""
    folder = tmp_path / "served"
    folder.mkdir()

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_by_url_through_the_weights_cache_and_in_bfloat16(
    tiny_flux: TinyModel, tmp_path: Path, served: tuple[Path, str]
) -> None:
    """As the worker loads `flux_model`: the URL becomes a content-named blob, which the loader reads by its keys."""
    folder, url = served
    shutil.copy(tiny_flux.pipeline_dir.parent / SINGLE_FILE_NAME, folder / "flux1-finetune.safetensors")
    weights = WeightsCache(tmp_path / "weights", FetchPolicy(allowed_hosts=frozenset({"127.0.0.1"})))
    blob = weights.resolve(f"{url}/flux1-finetune.safetensors", "flux_model")
    assert "flux" not in blob.name
    bf16 = torch.bfloat16
    loaded = load_pipeline(str(blob), torch_dtype=bf16, flux_single_file_config=str(tiny_flux.pipeline_dir))
    assert loaded.family == "flux" and loaded.pipe.transformer.dtype == bf16
    folder_bf16 = load_pipeline(str(tiny_flux.pipeline_dir), torch_dtype=bf16)
    np.testing.assert_array_equal(pixels(loaded, params()), pixels(folder_bf16, params()))


def test_an_all_in_one_file_takes_its_transformer_vae_and_text_encoders_from_the_file(
    tiny_flux: TinyModel, tmp_path: Path
) -> None:
    folder = load_pipeline(str(tiny_flux.pipeline_dir))
    plain = pixels(folder, params())
    prefixed = {flux_checkpoint.ALL_IN_ONE_PREFIX + name: t for name, t in bfl_tensors(tiny_flux).items()}
    transformer_only = load_single_file(write(tmp_path / "prefixed.safetensors", prefixed), tiny_flux)
    np.testing.assert_array_equal(pixels(transformer_only, params()), plain)
    all_in_one = load_single_file(save_flux_all_in_one(folder.pipe, tmp_path / "aio.safetensors"), tiny_flux)
    np.testing.assert_array_equal(pixels(all_in_one, params()), plain)
    without_vae = save_flux_all_in_one(folder.pipe, tmp_path / "no-vae.safetensors", vae=False)
    np.testing.assert_array_equal(pixels(load_single_file(without_vae, tiny_flux), params()), plain)
    # The VAE and text encoders are the file's, not the config checkpoint's.
    tensors = safetensors.torch.load_file(str(tmp_path / "aio.safetensors"))
    t5_norm, vae_out = ALL_IN_ONE_T5_PREFIX + "encoder.final_layer_norm.weight", "vae.decoder.conv_out.bias"
    tensors[t5_norm], tensors[vae_out] = tensors[t5_norm] * 2, tensors[vae_out] + 0.5
    edited = load_single_file(write(tmp_path / "edited.safetensors", tensors), tiny_flux)
    torch.testing.assert_close(edited.pipe.text_encoder_2.encoder.final_layer_norm.weight, tensors[t5_norm])
    torch.testing.assert_close(edited.pipe.vae.decoder.conv_out.bias, tensors[vae_out])
    assert not np.array_equal(pixels(edited, params()), plain)


def test_weights_that_do_not_fit_the_config_checkpoint_are_refused_naming_the_model(
    tiny_flux: TinyModel, tmp_path: Path
) -> None:
    tensors = bfl_tensors(tiny_flux)
    extra_block = {**tensors, **{k.replace("double_blocks.1.", "double_blocks.2."): t for k, t in tensors.items()}}
    unexpected = r"extra\.safetensors' does not fit .*Unexpected key.*transformer_blocks\.2\."
    with pytest.raises(ModelLoadError, match=unexpected):
        load_single_file(write(tmp_path / "extra.safetensors", extra_block), tiny_flux)
    wider = dict(tensors)
    wider["txt_in.weight"] = torch.zeros(tensors["txt_in.weight"].shape[0], 48)
    with pytest.raises(ModelLoadError, match=r"wider\.safetensors' does not fit .*context_embedder\.weight"):
        load_single_file(write(tmp_path / "wider.safetensors", wider), tiny_flux)
    missing = {k: t for k, t in tensors.items() if k != "img_in.bias"}
    with pytest.raises(ModelLoadError, match=r"missing\.safetensors' is not a FLUX.1 transformer: no 'img_in.bias'"):
        load_single_file(write(tmp_path / "missing.safetensors", missing), tiny_flux)
    sd3 = tmp_path / "sd3" / "transformer"
    sd3.mkdir(parents=True)
    (sd3 / "config.json").write_text('{"_class_name": "SD3Transformer2DModel"}')
    single = str(tiny_flux.pipeline_dir.parent / SINGLE_FILE_NAME)
    with pytest.raises(ModelLoadError, match=r"sd3' \(setting flux_single_file_config\): .* SD3Transformer2DModel"):
        load_pipeline(single, flux_single_file_config=str(sd3.parent))


def test_a_transformer_in_diffusers_names_loads_as_it_is_and_is_refused_as_the_bfl_layout_is(
    tiny_flux: TinyModel, tmp_path: Path
) -> None:
    """A diffusers folder's transformer weights handed over as one file: diffusers' inference alone takes
    it for SD 1.x ("v1") and sends it down the Stable Diffusion path."""
    weights = tiny_flux.pipeline_dir / "transformer" / "diffusion_pytorch_model.safetensors"
    tensors = safetensors.torch.load_file(str(weights))
    single = write(tmp_path / "flux1-finetune.safetensors", tensors)
    assert loading._single_file_model_type(single, "model") == "flux-dev"
    unguided = {name: t for name, t in tensors.items() if not name.startswith("time_text_embed.guidance_embedder.")}
    assert loading._single_file_model_type(write(tmp_path / "schnell.safetensors", unguided), "model") == "flux-schnell"
    folder = load_pipeline(str(tiny_flux.pipeline_dir))
    np.testing.assert_array_equal(pixels(load_single_file(single, tiny_flux), params()), pixels(folder, params()))
    extra_block = {**tensors, **{k.replace("s.1.", "s.2."): t for k, t in tensors.items()}}
    with pytest.raises(ModelLoadError, match=r"extra\.safetensors' does not fit .*Unexpected key.*blocks\.2\."):
        load_single_file(write(tmp_path / "extra.safetensors", extra_block), tiny_flux)
    fill = {**tensors, "x_embedder.weight": torch.zeros(tensors["x_embedder.weight"].shape[0], 384)}
    with pytest.raises(ModelLoadError, match=r"'.*fill\.safetensors' is a single-file flux-fill checkpoint"):
        load_single_file(write(tmp_path / "fill.safetensors", fill), tiny_flux)


def test_other_single_file_families_and_pickle_files_are_refused(tiny_flux: TinyModel, tmp_path: Path) -> None:
    tensors = bfl_tensors(tiny_flux)
    # FLUX.1 Fill: its image input also takes the masked image and the mask (384 features).
    fill = {**tensors, "img_in.weight": torch.zeros(tensors["img_in.weight"].shape[0], 384)}
    with pytest.raises(ModelLoadError, match=r"'.*fill\.safetensors' is a single-file flux-fill checkpoint"):
        load_single_file(write(tmp_path / "fill.safetensors", fill), tiny_flux)
    pickle = tmp_path / "flux1-dev.ckpt"
    pickle.write_bytes(b"not read")
    with pytest.raises(ModelLoadError, match=r"flux1-dev\.ckpt'.*pickle"):
        load_single_file(pickle, tiny_flux)


def test_the_layout_mapping_agrees_with_diffusers_converter_at_flux1_widths() -> None:
    """diffusers' converter only splits FLUX.1's own widths, so it is checked on FLUX.1-shaped fused
    tensors with every other tensor small (the mapping reads no other shape)."""
    generator = torch.Generator().manual_seed(0)
    bfl: dict[str, torch.Tensor] = {}
    for diffusers_names, name, how in flux_checkpoint.tensor_pairs({"guidance_in.in_layer.weight"}, (2, 3)):
        rows = FLUX1_WIDTH if name.startswith("img_in.") else 4
        if how == flux_checkpoint.FUSED:
            rows = FLUX1_WIDTH * 3 + (FLUX1_MLP if len(diffusers_names) == 4 else 0)
        bfl[name] = torch.randn((rows, 2) if name.endswith(".weight") else (rows,), generator=generator)
    ours = flux_checkpoint.to_diffusers(bfl)
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))
    assert sorted(ours) == sorted(theirs)
    for name, tensor in theirs.items():
        assert torch.equal(ours[name], tensor), name
    back = flux_checkpoint.to_bfl(ours)
    assert sorted(back) == sorted(bfl)
    assert all(torch.equal(back[name], tensor) for name, tensor in bfl.items())


@pytest.mark.parametrize(
    ("tensors", "pipeline"),
    [
        ({f"{SD_UNET}output_blocks.11.0.skip_connection.weight": (1,)}, "StableDiffusionPipeline"),
        ({f"{SD_UNET}input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024)}, "StableDiffusionPipeline"),
        ({f"{SD_UNET}input_blocks.0.0.weight": (320, 9, 3, 3)}, "StableDiffusionPipeline"),
        ({"conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": (1,)}, "StableDiffusionXLPipeline"),
        ({"conditioner.embedders.0.model.transformer.resblocks.9.mlp.c_proj.bias": (1,)}, None),
    ],
    ids=["sd15", "sd2", "sd-inpainting", "sdxl", "sdxl-refiner"],
)
def test_sd_single_files_keep_their_pipelines(
    tensors: dict[str, tuple[int, ...]], pipeline: str | None, tmp_path: Path
) -> None:
    """SD 1.x/2.x and SDXL files go to the pipelines the old SDXL-key check chose (the refiner, which that
    check sent to the SD pipeline to fail there, is refused by name)."""
    path = write(tmp_path / "model.safetensors", {key: torch.zeros(shape) for key, shape in tensors.items()})
    model_type = loading._single_file_model_type(path, "model")
    assert getattr(loading.SD_SINGLE_FILE_TYPES.get(model_type), "__name__", None) == pipeline
