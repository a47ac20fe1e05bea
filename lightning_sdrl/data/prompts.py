"""Where prompts come from: a list, a text file, or a template with fill-ins."""

from __future__ import annotations

from pathlib import Path


def load_prompts(
    prompts: list[str] | None = None,
    prompt_file: str | Path | None = None,
    template: str | None = None,
    fill_ins: list[str] | None = None,
) -> list[str]:
    """The prompt list from exactly one source.

    Args:
        prompts: the prompts themselves.
        prompt_file: a UTF-8 text file with one prompt per line (blank lines and lines starting
            with ``#`` are skipped).
        template: a ``str.format`` template with one ``{}`` field, e.g.
            ``"photo of the face of a {}"``, combined with every entry of ``fill_ins``.
        fill_ins: the values for ``template``.

    Example:
        >>> load_prompts(template="photo of the face of a {}", fill_ins=["nurse", "engineer"])
        ['photo of the face of a nurse', 'photo of the face of a engineer']
    """
    given = [
        name
        for name, value in (("prompts", prompts), ("prompt_file", prompt_file), ("template", template))
        if value is not None
    ]
    if len(given) != 1:
        raise ValueError(
            f"got prompt sources {given or 'none'}; set exactly one of prompts, prompt_file or template (+ fill_ins)"
        )
    if fill_ins is not None and template is None:
        raise ValueError("fill_ins was given without template; set template, e.g. 'photo of a {}'")
    if prompt_file is not None:
        path = Path(prompt_file)
        if not path.is_file():
            raise FileNotFoundError(
                f"prompt_file '{path}' does not exist; expected a text file with one prompt per line"
            )
        lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
        result = [line for line in lines if line and not line.startswith("#")]
    elif template is not None:
        if template.count("{}") != 1:
            raise ValueError(f"template={template!r} must contain exactly one '{{}}' field")
        if not fill_ins:
            raise ValueError(f"template={template!r} needs a non-empty fill_ins list")
        result = [template.format(value) for value in fill_ins]
    else:
        result = [str(p) for p in prompts]
    if not result:
        raise ValueError(f"the prompt list from {given[0]} is empty; expected at least one prompt")
    return result
