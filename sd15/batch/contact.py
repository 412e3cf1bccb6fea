"""Contact sheets of grid rows: the images of a 1-D or 2-D grid side by side, with their axis labels
(A1111's X/Y plot). The first axis runs along the columns, the second (if any) down the rows.

    sheet = contact_sheet(grid, {id: PIL image})      # a PIL image
    out.write_grid(grid.base_id, png_bytes(sheet))   # grids/ID.png

Cells are as large as the largest image (a size axis gives cells of several sizes: each image sits at
its cell's top left). Labels use PIL's default font, "AXIS: VALUE", cut with "..." to fit their cell.
"""

from PIL import Image, ImageDraw, ImageFont

from .job import GridRow

PAD = 4
LABEL_COLUMN_MAX = 220       # pixels of the left labels (row axis) at most


def label_text(axis_label: str, value) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return f"{axis_label}: {value}"


def contact_sheet(grid: GridRow, images: dict) -> Image.Image:
    font = ImageFont.load_default()
    x_axis = grid.axes[0]
    y_axis = grid.axes[1] if len(grid.axes) == 2 else None
    columns, rows = len(x_axis.values), (len(y_axis.values) if y_axis else 1)
    cells = [images[i] for i in grid.ids]
    cell_w, cell_h = max(im.width for im in cells), max(im.height for im in cells)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = _text_size(probe, "Ag", font)[1] + 2 * PAD
    left = 0
    if y_axis is not None:
        widest = max(_text_size(probe, label_text(y_axis.label, v), font)[0] for v in y_axis.values)
        left = min(widest + 2 * PAD, LABEL_COLUMN_MAX)
    sheet = Image.new("RGB", (left + columns * cell_w, line_h + rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    for c, value in enumerate(x_axis.values):
        text = _fit(draw, label_text(x_axis.label, value), font, cell_w - 2 * PAD)
        w, _ = _text_size(draw, text, font)
        draw.text((left + c * cell_w + (cell_w - w) // 2, PAD), text, fill="black", font=font)
    if y_axis is not None:
        for r, value in enumerate(y_axis.values):
            text = _fit(draw, label_text(y_axis.label, value), font, left - 2 * PAD)
            _, h = _text_size(draw, text, font)
            draw.text((PAD, line_h + r * cell_h + (cell_h - h) // 2), text, fill="black", font=font)
    for n, image in enumerate(cells):          # the last axis varies fastest: n = column * rows + row
        c, r = divmod(n, rows)
        sheet.paste(image.convert("RGB"), (left + c * cell_w, line_h + r * cell_h))
    return sheet


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
    return x1 - x0, y1 - y0


def _fit(draw, text: str, font, width: int) -> str:
    if _text_size(draw, text, font)[0] <= width:
        return text
    while text and _text_size(draw, text + "...", font)[0] > width:
        text = text[:-1]
    return text + "..." if text else ""
