"""The offline report page: result tables plus a gallery of test images, saliency overlays,
generated critiques, references and EAT scores.

Everything lives in the report directory (inline CSS, no scripts, no CDN): images are copied as
~256 px JPEG thumbnails and overlays as PNG into ``images/``, referenced by relative paths. All
text is HTML-escaped.
"""
from __future__ import annotations

import hashlib
import html
import io
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps

from storage.atomic import write_bytes_atomic

THUMB_SIZE = 256
GALLERY_METRICS = ("Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE_L")
CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:2rem;color:#222;background:#fafafa}
h1{font-size:1.6rem}h2{margin-top:2rem}
table{border-collapse:collapse;margin:.5rem 0 1rem;font-size:.85rem}
th,td{border:1px solid #ccc;padding:.25rem .5rem;text-align:right}
th:first-child,td:first-child,th:nth-child(2),td:nth-child(2){text-align:left}
tr.ours td{background:#eef6ee;font-weight:600}
.note{font-size:.8rem;color:#555;margin:.2rem 0}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(540px,1fr));gap:1rem}
.item{background:#fff;border:1px solid #ddd;border-radius:6px;padding:.75rem}
.pics{display:flex;gap:.5rem}.pics figure{margin:0}.pics img{max-width:256px;max-height:256px;display:block}
figcaption{font-size:.75rem;color:#666}
.critique{font-size:.95rem;margin:.5rem 0}
.refs{font-size:.8rem;color:#444;max-height:12rem;overflow:auto;padding-left:1.2rem}
.meta{font-size:.75rem;color:#555}
img.figure{max-width:100%;height:auto;border:1px solid #ddd;background:#fff}
"""


@dataclass(frozen=True)
class GalleryItem:
    image_path: Path
    overlay_path: Path | None  # saliency overlay image (any format PIL reads), or None
    caption: str  # the generated critique
    references: list[str]
    eat_score: float | None = None
    metrics: dict[str, float | None] | None = None  # per-image scores
    image_id: str = ""


def _thumbnail(src: Path, out_dir: Path, fmt: str) -> str:
    """Copy ``src`` as a thumbnail under ``out_dir/images`` (skipped when already there); relative path."""
    stat = src.stat()
    key = hashlib.sha1(f"{src.resolve()}:{stat.st_mtime_ns}:{stat.st_size}".encode()).hexdigest()[:16]
    rel = f"images/{key}.{'jpg' if fmt == 'JPEG' else 'png'}"
    if not (out_dir / rel).exists():
        with Image.open(src) as img:
            img.draft("RGB", (THUMB_SIZE, THUMB_SIZE))  # JPEG: decode at reduced size
            try:  # upright, as open_rgb gives the model and the overlay
                img = ImageOps.exif_transpose(img)
            except Exception:  # malformed EXIF: keep the stored orientation (as open_rgb does)
                pass
            img = img.convert("RGB")
            img.thumbnail((THUMB_SIZE, THUMB_SIZE))
            buf = io.BytesIO()
            img.save(buf, fmt, **({"quality": 85} if fmt == "JPEG" else {}))
        write_bytes_atomic(out_dir / rel, buf.getvalue())
    return rel


_FIGURE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")  # ![alt](relative/path.png) on a line of its own


def markdown_to_html(text: str) -> str:
    """The Markdown our tables use (### headings, pipe tables, figures, paragraphs) as escaped HTML."""
    out, rows = [], []

    def flush() -> None:
        if rows:
            head, body = rows[0], rows[1:]
            out.append("<table><thead><tr>" + "".join(f"<th>{c}</th>" for c in head) + "</tr></thead><tbody>")
            for r in body:
                cls = ' class="ours"' if len(r) > 1 and r[1] == "ours" else ""
                out.append(f"<tr{cls}>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>")
            out.append("</tbody></table>")
            rows.clear()

    for line in text.splitlines():
        if line.startswith("|"):
            if not line.startswith("|---"):
                rows.append([html.escape(c.strip()) for c in line.strip().strip("|").split("|")])
            continue
        flush()
        if line.startswith("### "):
            out.append(f"<h3>{html.escape(line[4:])}</h3>")
        elif (figure := _FIGURE.fullmatch(line.strip())) is not None:
            alt, src = (html.escape(g, quote=True) for g in figure.groups())
            out.append(f'<figure><img src="{src}" alt="{alt}" class="figure"><figcaption>{alt}</figcaption></figure>')
        elif line.strip():
            out.append(f'<p class="note">{html.escape(line)}</p>')
    flush()
    return "\n".join(out)


def _item_html(item: GalleryItem, out_dir: Path) -> str:
    e = html.escape
    pics = [f'<figure><img src="{e(_thumbnail(item.image_path, out_dir, "JPEG"))}" alt="image {e(item.image_id)}" '
            f'loading="lazy"><figcaption>image</figcaption></figure>']
    if item.overlay_path is not None:
        pics.append(f'<figure><img src="{e(_thumbnail(item.overlay_path, out_dir, "PNG"))}" '
                    f'alt="saliency overlay {e(item.image_id)}" loading="lazy">'
                    f"<figcaption>aesthetic saliency (LayerCAM)</figcaption></figure>")
    meta = [f"id {e(item.image_id)}"] if item.image_id else []
    if item.eat_score is not None:
        meta.append(f"EAT score {item.eat_score:.2f}")
    meta += [f"{e(k)} {v:.3f}" for k, v in (item.metrics or {}).items() if k in GALLERY_METRICS and v is not None]
    refs = "".join(f"<li>{e(r)}</li>" for r in item.references)
    return (f'<div class="item"><div class="pics">{"".join(pics)}</div>'
            f'<p class="critique"><b>Generated:</b> {e(item.caption)}</p>'
            f'<details><summary>{len(item.references)} reference critique(s)</summary><ul class="refs">{refs}</ul></details>'
            f'<p class="meta">{" · ".join(meta)}</p></div>')


def render_report(out_dir: Path, title: str, tables: dict[str, str], items: list[GalleryItem]) -> Path:
    """Write ``out_dir/index.html`` (+ thumbnails); ``tables`` maps a heading to Markdown (or ready HTML)."""
    from tqdm import tqdm

    sections = []
    for heading, body in tables.items():
        body = body.removeprefix(f"### {heading}\n")  # the section heading already says it
        content = body if body.lstrip().startswith("<") else markdown_to_html(body)
        sections.append(f"<section><h2>{html.escape(heading)}</h2>\n{content}</section>")
    cards = [_item_html(item, out_dir) for item in tqdm(items, desc="gallery", unit="img", disable=len(items) < 50)]
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><link rel="icon" href="data:,">'
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>\n"
            f"<h1>{html.escape(title)}</h1>\n" + "\n".join(sections)
            + f'\n<section><h2>Gallery ({len(items)} test images)</h2><div class="gallery">\n'
            + "\n".join(cards) + "\n</div></section></body></html>\n")
    target = out_dir / "index.html"
    write_bytes_atomic(target, page.encode("utf-8"))
    return target
