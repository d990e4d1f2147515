"""Every prompt MOSAIC renders, as jinja2 templates under this folder.

One environment with StrictUndefined, so a template that names a variable the caller did not
pass fails loudly instead of rendering an empty string into a model prompt.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import jinja2


@lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("mosaic.prompts", "."),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=False,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )


def render(template: str, **variables: Any) -> str:
    """Render `prompts/<template>` (e.g. "judges/jailbreak_response.j2")."""
    return environment().get_template(template).render(**variables)


def template_names() -> list[str]:
    return sorted(n for n in environment().list_templates() if n.endswith(".j2"))
