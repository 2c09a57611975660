"""Sites: named weight matrices of a model, addressed independently of its architecture."""

from __future__ import annotations

from dataclasses import dataclass

from spectra.errors import SpectraError

#: The abstract matrix kinds every adapter maps onto module paths.
SITE_KINDS: tuple[str, ...] = ("mlp.up", "mlp.gate", "mlp.down", "attn.q", "attn.k", "attn.v", "attn.o")


@dataclass(frozen=True, order=True)
class Site:
    """One weight matrix: ``Site(layer=5, kind="mlp.down")``, read and written as (out, in)."""

    layer: int
    kind: str

    def __post_init__(self) -> None:
        if self.kind not in SITE_KINDS:
            raise SpectraError(
                f"Unknown site kind {self.kind!r}. Site kinds are {', '.join(SITE_KINDS)}; "
                "write a site as KIND@LAYER, for example mlp.down@3."
            )

    def __str__(self) -> str:
        return f"{self.kind}@{self.layer}"

    @classmethod
    def parse(cls, text: str) -> "Site":
        """Parse ``KIND@LAYER`` (the form ``str(site)`` produces)."""
        kind, sep, layer = text.strip().partition("@")
        if not sep or not layer.strip().lstrip("-").isdigit():
            raise SpectraError(
                f"Cannot read the site {text!r}: write it as KIND@LAYER, for example mlp.down@3 "
                f"(kinds: {', '.join(SITE_KINDS)})."
            )
        return cls(layer=int(layer), kind=kind.strip())


def parse_sites(spec: str, n_layers: int, available_kinds: tuple[str, ...]) -> list[Site]:
    """Expand a comma-separated site list; a bare kind (``mlp.down``) means that kind in every layer.

    Layers are checked against the model so that an out-of-range layer fails before any work.
    """
    sites: list[Site] = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        if "@" in part:
            site = Site.parse(part)
            candidates = [site]
        else:
            candidates = [Site(layer=i, kind=part) for i in range(n_layers)]
        for site in candidates:
            if not 0 <= site.layer < n_layers:
                raise SpectraError(
                    f"Layer {site.layer} in site {site} is out of range: this model has layers "
                    f"0..{n_layers - 1}."
                )
            if site.kind not in available_kinds:
                raise SpectraError(
                    f"This model has no {site.kind!r} matrices; it has {', '.join(available_kinds)}."
                )
            sites.append(site)
    if not sites:
        raise SpectraError("No sites given: name at least one, for example --sites mlp.down.")
    return sorted(dict.fromkeys(sites))
