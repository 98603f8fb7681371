"""Image decoders, and the crops that pick their region from the file's header before decoding.

RandomResizedCrop needs only an image's size to draw its box, and the box then needs only as many
pixels as its output. A JPEG decodes at 1/2, 1/4 or 1/8 of its size for less than a full decode
(libjpeg's DCT scaling), so :class:`RandomResizedCropFlip` draws its box from the header, decodes
at the smallest of those scales that still covers the box at the output size (it never enlarges
what it would otherwise shrink) and resizes the same region of the smaller image.
:class:`ResizeCenterCrop` (the test crop) does the same for the shorter side.

Decoders (``DECODERS``; the ``imagefolder`` dataset's ``--decoder``):

* ``simplejpeg`` (the default): libjpeg-turbo through the ``simplejpeg`` package, with DCT
  scaling, into an array that torch crops and resizes (its vectorized antialiased bilinear
  resize for uint8; Pillow's where a reduced box has fractional edges); a file simplejpeg cannot
  read (PNG, CMYK JPEG, a damaged file) goes to Pillow, which reads it or names it bad.
* ``pil-draft``: Pillow's draft mode (the same DCT scaling), Pillow's resize.
* ``pil``: Pillow's full decode, crop and resize: torchvision's transforms, byte for byte.

The box and the flip are drawn from torch's generator by the same calls, in the same order, as
``T.RandomResizedCrop`` + ``T.RandomHorizontalFlip``, so the augmentations stay a function of the
loader's worker seeds (the same bytes on resume) and ``pil`` gives the bytes those transforms give.
The others give slightly other pixels for the same region: a reduced decode averages blocks of
pixels in the DCT domain (a few levels out of 255 from a full decode and resize, most at sharp
edges), and torch's resize rounds a few values 1 level off Pillow's.
``bench/loader_bench.py`` measures the decoders side by side.
"""
from __future__ import annotations

import io
import math
from typing import Tuple

import numpy as np
import simplejpeg
import torch
import torch.nn.functional as F
from PIL import Image

from ..registry import Registry

DECODERS = Registry("decoder")
DCT_SCALES = (8, 4, 2, 1)  # the reductions libjpeg's scaled IDCT offers in powers of two
Box = Tuple[float, float, float, float]  # left, top, right, bottom in full-size pixels


def dct_scale(width: float, height: float, out_w: int, out_h: int) -> int:
    """The largest reduction ``s`` (8, 4, 2 or 1) that leaves a ``width`` x ``height`` region at
    least ``out_w`` x ``out_h`` pixels: decoding at 1/s then only shrinks it.

    >>> dct_scale(500, 460, 224, 224), dct_scale(447, 460, 224, 224), dct_scale(100, 100, 224, 224)
    (2, 1, 1)
    """
    return next((s for s in DCT_SCALES if width >= s * out_w and height >= s * out_h), 1)


def center_box(width: int, height: int, resize: int, size: int) -> Box:
    """The region of a ``width`` x ``height`` image that ``T.Resize(resize)`` + ``T.CenterCrop(size)``
    keep, in the image's pixels (torchvision's rounding of the resized sides and the crop's corner)."""
    short, long = sorted((width, height))
    rw, rh = (resize, int(resize * long / short)) if width <= height else (int(resize * long / short), resize)
    left, top = int(round((rw - size) / 2.0)), int(round((rh - size) / 2.0))
    fx, fy = width / rw, height / rh
    return left * fx, top * fy, (left + size) * fx, (top + size) * fy


def to_tensor(image: Image.Image) -> torch.Tensor:
    """``T.PILToTensor()``: uint8, channels first (a view of one HWC copy of the pixels)."""
    array = np.array(image)
    return torch.from_numpy(array.reshape(image.height, image.width, -1)).permute(2, 0, 1)


def pil_crop_resized(image: Image.Image, box: Box, scale: int, size: int) -> Image.Image:
    """The region ``box`` of ``image`` decoded at 1/``scale``, resized to ``size`` x ``size`` by
    Pillow (bilinear, antialiased). At scale 1 and an integer box this is torchvision's
    ``resized_crop`` (crop, then resize); a reduced image is cropped to the pixels that cover the
    box and resized from the box's fractional edges inside them."""
    left, top, right, bottom = (v / scale for v in box)
    x0, y0 = math.floor(left), math.floor(top)
    x1, y1 = min(math.ceil(right), image.width), min(math.ceil(bottom), image.height)
    return image.crop((x0, y0, x1, y1)).resize((size, size), Image.BILINEAR,
                                               box=(left - x0, top - y0, right - x0, bottom - y0))


def array_crop_resized(hwc: np.ndarray, box: Box, scale: int, size: int) -> torch.Tensor:
    """The region ``box`` of an HWC uint8 image decoded at 1/``scale``, resized to ``size`` x
    ``size`` (bilinear, antialiased): uint8 CHW. A box on whole pixels (always at scale 1) is
    resized by torch's vectorized uint8 path (its values within 1 of Pillow's); a box with
    fractional edges in the reduced image, by Pillow, which resizes from fractional edges."""
    left, top, right, bottom = (v / scale for v in box)
    if not all(float(v).is_integer() for v in (left, top, right, bottom)):
        return to_tensor(pil_crop_resized(Image.fromarray(hwc, "RGB"), box, scale, size))
    region = torch.from_numpy(hwc)[int(top):int(bottom), int(left):int(right)].permute(2, 0, 1)[None]
    if region.shape[-2:] != (size, size):  # channels-last: torch's vectorized uint8 path
        region = F.interpolate(region.contiguous(memory_format=torch.channels_last), size=(size, size),
                               mode="bilinear", align_corners=False, antialias=True)
    return region[0]


class Encoded:
    """One opened image file: ``size`` (width, height) from its header, pixels decoded on demand,
    at 1/``scale`` where the format allows. Read once (a file is opened for one sample)."""

    size: Tuple[int, int]

    def crop_resized(self, mode: str, box: Box, scale: int, size: int) -> torch.Tensor:
        """The region ``box`` at ``size`` x ``size``, uint8 CHW."""
        raise NotImplementedError

    def center_cropped(self, mode: str, scale: int, resize: int, size: int) -> torch.Tensor:
        """``T.Resize(resize)`` + ``T.CenterCrop(size)`` of the image, uint8 CHW."""
        raise NotImplementedError


class PILEncoded(Encoded):
    """An image file opened by Pillow (``draft``: JPEGs decoded at the requested scale)."""

    def __init__(self, data: bytes, draft: bool):
        self.image = Image.open(io.BytesIO(data))
        self.size = self.image.size
        self.draft = draft

    def pixels(self, mode: str, scale: int) -> Tuple[Image.Image, int]:
        """``(image in mode, reduction used)``: ``scale`` where draft mode can (a JPEG), else 1."""
        image, used = self.image, 1
        if self.draft and scale > 1:
            w, h = self.size
            drafted = image.draft(image.mode, (w // scale, h // scale))  # picks exactly `scale`
            used = 1 if drafted is None else round(w / drafted[1][2])
        image.load()
        return (image if image.mode == mode else image.convert(mode)), used

    def crop_resized(self, mode: str, box: Box, scale: int, size: int) -> torch.Tensor:
        image, used = self.pixels(mode, scale)
        return to_tensor(pil_crop_resized(image, box, used, size))

    def center_cropped(self, mode: str, scale: int, resize: int, size: int) -> torch.Tensor:
        from torchvision.transforms import functional as TF
        image, _ = self.pixels(mode, scale)
        return to_tensor(TF.center_crop(TF.resize(image, [resize]), [size, size]))


class TurboEncoded(Encoded):
    """A JPEG decoded by libjpeg-turbo (``simplejpeg``) into a tensor; Pillow reads what it refuses."""

    def __init__(self, data: bytes, size: Tuple[int, int]):
        self.data, self.size = data, size

    def array(self, scale: int) -> np.ndarray:
        """RGB HWC pixels at 1/``scale``; ``ValueError`` for a file libjpeg-turbo refuses."""
        w, h = self.size  # the smallest libjpeg scale >= ceil(size / scale) is 1/scale itself
        return simplejpeg.decode_jpeg(self.data, "RGB", min_width=-(-w // scale), min_height=-(-h // scale))

    def crop_resized(self, mode: str, box: Box, scale: int, size: int) -> torch.Tensor:
        if mode == "RGB":
            try:
                return array_crop_resized(self.array(scale), box, scale, size)
            except ValueError:
                pass  # damaged, CMYK, ...: what Pillow makes of it (read, or raised as a bad image)
        return PILEncoded(self.data, draft=True).crop_resized(mode, box, scale, size)

    def center_cropped(self, mode: str, scale: int, resize: int, size: int) -> torch.Tensor:
        return self.crop_resized(mode, center_box(*self.size, resize, size), scale, size)


class Decoder:
    """Opens encoded image bytes: ``open(data)`` -> an :class:`Encoded`."""

    def open(self, data: bytes) -> Encoded:
        raise NotImplementedError


@DECODERS.register("pil")
class PILDecoder(Decoder):
    """Pillow, full size: torchvision's transforms byte for byte."""

    def open(self, data: bytes) -> Encoded:
        return PILEncoded(data, draft=False)


@DECODERS.register("pil-draft")
class PILDraftDecoder(Decoder):
    """Pillow's JPEG draft mode: decoded at 1/2, 1/4 or 1/8 where the crop allows."""

    def open(self, data: bytes) -> Encoded:
        return PILEncoded(data, draft=True)


@DECODERS.register("simplejpeg")
class SimpleJPEGDecoder(Decoder):
    """libjpeg-turbo through simplejpeg, DCT-scaled, resized by torch; other files through Pillow."""

    encoded = TurboEncoded

    def open(self, data: bytes) -> Encoded:
        try:
            h, w, _, _ = simplejpeg.decode_jpeg_header(data)
        except ValueError:  # not a JPEG simplejpeg reads (a PNG, ...)
            return PILEncoded(data, draft=True)
        return self.encoded(data, (w, h))


class DecodingTransform:
    """A transform of encoded bytes (not of a decoded image): ``transform(data, mode)`` -> uint8 CHW.
    :class:`~.images.ImageSamples` hands such a transform the file's bytes."""

    def __init__(self, size: int, decoder: str):
        self.size, self.decoder_name = size, decoder
        self.decoder: Decoder = DECODERS.create(decoder)

    def __call__(self, data: bytes, mode: str) -> torch.Tensor:
        raise NotImplementedError


class RandomResizedCropFlip(DecodingTransform):
    """``T.RandomResizedCrop(size)`` + ``T.RandomHorizontalFlip()`` + ``T.PILToTensor()`` on the
    file's bytes: the box drawn from the header, the file decoded at the scale the box allows."""

    def __init__(self, size: int, decoder: str, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
        from torchvision.transforms import RandomResizedCrop
        super().__init__(size, decoder)
        self.area, self.ratio = scale, ratio
        self.draw = RandomResizedCrop.get_params

    def box(self, width: int, height: int) -> Tuple[int, int, int, int]:
        """``(left, top, right, bottom)``: torchvision's draws (``RandomResizedCrop.get_params``,
        which reads only the shape of the zero-stride tensor it is given)."""
        top, left, h, w = self.draw(torch.empty(()).expand(height, width), self.area, self.ratio)
        return left, top, left + w, top + h

    def __call__(self, data: bytes, mode: str) -> torch.Tensor:
        encoded = self.decoder.open(data)
        box = self.box(*encoded.size)
        scale = dct_scale(box[2] - box[0], box[3] - box[1], self.size, self.size)
        out = encoded.crop_resized(mode, box, scale, self.size)
        return out.flip(-1) if torch.rand(1) < 0.5 else out  # RandomHorizontalFlip's draw, after the crop's


class ResizeCenterCrop(DecodingTransform):
    """``T.Resize(resize)`` + ``T.CenterCrop(size)`` + ``T.PILToTensor()`` on the file's bytes,
    decoded at the smallest scale whose shorter side is still at least ``resize``."""

    def __init__(self, size: int, decoder: str, resize: int):
        super().__init__(size, decoder)
        self.resize = resize

    def __call__(self, data: bytes, mode: str) -> torch.Tensor:
        encoded = self.decoder.open(data)
        short = min(encoded.size)
        return encoded.center_cropped(mode, dct_scale(short, short, self.resize, self.resize), self.resize, self.size)
