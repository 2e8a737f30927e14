"""`cham generate`: prompt a checkpoint; text streams to the terminal, the response is saved as HTML + JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from flows.cli.output import console, fail, output_folder
from schemas import ConfigError, GenerateConfig, load_config, validate_config
from schemas.generate_config import GenerationMode

if TYPE_CHECKING:
    from model.tokenizers.mixed_tokenizer import Segment

CHAT_HELP = "end the prompt with the SFT separator (default: yes for fine-tuned checkpoints)"


def _overrides(config: GenerateConfig, **changes: Any) -> GenerateConfig:
    data = config.model_dump(mode="json")
    for key, value in changes.items():
        if value is None:
            continue
        section, _, field = key.partition(".")
        if field:
            data[section][field] = value
        else:
            data[key] = value
    return validate_config(GenerateConfig, data, "command-line options")


def _prompt_images(files: list[Path], out: Path) -> list[dict[str, Any]]:
    """Check each prompt image opens, and keep a thumbnail of it for the page."""
    from model.generation.segment_output import save_thumbnail

    records = []
    for k, file in enumerate(files):
        path = Path("images") / f"prompt-{k}.png"
        try:
            save_thumbnail(file, out / path)
        except ValueError as err:
            raise fail(f"--image {err}") from None
        records.append({"kind": "image", "path": path.as_posix(), "source": str(file)})
    return records


def generate(
    out: Annotated[Path, typer.Option("--out", help="folder for generation.html, generation.json and images/")],
    prompt: Annotated[str, typer.Option("--prompt", help="the prompt text")] = "",
    image: Annotated[
        list[Path] | None, typer.Option("--image", help="a prompt image (repeatable); before the text")
    ] = None,
    checkpoint: Annotated[
        str | None, typer.Option(help="a run's out_dir, its checkpoints/ or a step folder (a path or s3:// etc.)")
    ] = None,
    config_file: Annotated[Path | None, typer.Option("--config", help="a GenerateConfig YAML file")] = None,
    mode: Annotated[
        GenerationMode | None, typer.Option(help="text, image or mixed (default: the config's, mixed)")
    ] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="at most this many new tokens")] = None,
    temperature: Annotated[float | None, typer.Option(help="text sampling temperature (0 = greedy)")] = None,
    seed: Annotated[int | None, typer.Option(help="sampling seed")] = None,
    chat: Annotated[
        bool | None,
        typer.Option(
            "--chat/--no-chat", help="end the prompt with the SFT separator (default: yes for fine-tuned checkpoints)"
        ),
    ] = None,
    guidance: Annotated[bool, typer.Option("--cfg/--no-cfg", help="classifier-free guidance for images")] = True,
    text_tokenizer: Annotated[Path | None, typer.Option(help="override the text tokenizer the run recorded")] = None,
    image_tokenizer: Annotated[Path | None, typer.Option(help="override the image tokenizer the run recorded")] = None,
) -> None:
    """Generate text, images or both for one prompt; streams text, then writes an HTML page with images inline."""
    if not prompt and not image:
        raise fail("give a --prompt, an --image, or both")
    from model.generation.generator import Generator
    from model.generation.inference import load_inference_model
    from model.generation.prompting import PromptError, respond
    from model.generation.segment_output import html_page, save_segments, segments_html
    from model.tokenizers.mixed_tokenizer import ImageSegment
    from model.training.checkpointing import CheckpointError

    try:
        if config_file is not None:
            config = load_config(GenerateConfig, config_file)
        elif checkpoint is not None:
            config = validate_config(GenerateConfig, {"checkpoint": str(checkpoint)}, "--checkpoint")
        else:
            raise fail("give --checkpoint DIR or --config FILE")
        config = _overrides(
            config,
            checkpoint=str(checkpoint) if checkpoint else None,
            mode=mode,
            max_new_tokens=max_new_tokens,
            seed=seed,
            **{"text.temperature": temperature},
        )
        loaded = load_inference_model(config.checkpoint, text_tokenizer, image_tokenizer)
    except (ConfigError, CheckpointError) as err:
        raise fail(str(err)) from None
    output_folder(out)
    prompt_records = _prompt_images(list(image or []), out)
    segments: list[Any] = [Path(r["source"]) for r in prompt_records] + ([prompt] if prompt else [])
    console.print(f"[dim]{loaded.checkpoint} (step {loaded.step}), {config.mode} mode[/dim]")
    images_seen = 0

    def show(segment: Segment) -> None:
        nonlocal images_seen
        if isinstance(segment, ImageSegment):
            images_seen += 1
            console.print(f"\n[cyan][image {images_seen}][/cyan]")
        else:
            console.print(segment, end="", markup=False, highlight=False)

    generator = Generator(loaded.model, loaded.vocab, config, guidance=guidance)
    try:
        response = respond(loaded, generator, segments, config.mode, config.max_new_tokens, config.seed, chat, show)
    except (PromptError, ValueError) as err:
        raise fail(str(err)) from None
    console.print()
    records = save_segments(response.segments, out, "response")
    result = {
        "prompt": prompt,
        "prompt_images": [r["source"] for r in prompt_records],
        "mode": config.mode,
        "checkpoint": str(loaded.checkpoint),
        "step": loaded.step,
        "segments": records,
        "prompt_tokens": response.prompt_tokens,
        "new_tokens": response.new_tokens,
        "seconds": round(response.seconds, 3),
        "config": config.model_dump(mode="json"),
    }
    (out / "generation.json").write_text(json.dumps(result, indent=2))
    body = (
        f"<p class='meta'>{loaded.checkpoint}, step {loaded.step}, {config.mode} mode, seed {config.seed}: "
        f"{response.new_tokens} new tokens in {response.seconds:.1f} s</p>\n"
        f"<h2>Prompt</h2><div class='prompt'>{segments_html([*prompt_records, {'kind': 'text', 'text': prompt}])}"
        f"</div>\n<h2>Response</h2><div class='response'>{segments_html(records)}</div>"
    )
    (out / "generation.html").write_text(html_page("cham generate", body))
    n_images = sum(r["kind"] == "image" for r in records)
    console.print(
        f"{response.new_tokens} tokens ({n_images} images) in {response.seconds:.1f} s; open {out / 'generation.html'}"
    )
