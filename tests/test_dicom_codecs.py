"""DICOM transfer syntaxes of real archives: JPEG Lossless (process 14; no encoder ships with pydicom or its
plugins, so a minimal one is written here), JPEG-LS and JPEG 2000 decode through pylibjpeg's plugins (the
`dicom` extra); a frame no installed decoder reads is skipped and counted, its error line naming the syntax."""
import numpy as np
import pytest

import us_data as D

pydicom = pytest.importorskip("pydicom")

# ITU-T T.81 Annex K.3, table K.3: the example luminance DC Huffman table (code lengths 1..16, categories 0..11)
DC_BITS = [0, 1, 5, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0]


def jpeg_lossless(img):
    """8-bit gray (H, W) -> a JPEG Lossless bitstream (SOF3, predictor 1 = the left neighbour, Pt = 0), i.e.
    what transfer syntaxes 1.2.840.10008.1.2.4.70 (SV1) and .57 (any predictor) hold."""
    codes, code, k = {}, 0, 0
    for length, n in enumerate(DC_BITS, 1):  # canonical Huffman codes (T.81 Annex C)
        for _ in range(n):
            codes[k] = (code, length)
            code, k = code + 1, k + 1
        code <<= 1
    x = img.astype(np.int64)
    pred = np.empty_like(x)
    pred[0, 0] = 128  # 2 ** (P - Pt - 1)
    pred[0, 1:] = x[0, :-1]  # first row: the left neighbour
    pred[1:, 0] = x[:-1, 0]  # first column: the one above
    pred[1:, 1:] = x[1:, :-1]  # predictor 1
    bits = []
    for d in (x - pred).ravel().tolist():
        ssss = abs(d).bit_length()
        c, n = codes[ssss]
        bits.append(format(c, f"0{n}b"))
        if ssss:
            bits.append(format(d if d > 0 else d + (1 << ssss) - 1, f"0{ssss}b"))
    s = "".join(bits)
    s += "1" * (-len(s) % 8)  # pad with 1-bits
    data = int(s, 2).to_bytes(len(s) // 8, "big").replace(b"\xff", b"\xff\x00")  # byte stuffing
    h, w = img.shape
    sof = bytes([0xFF, 0xC3, 0, 11, 8]) + h.to_bytes(2, "big") + w.to_bytes(2, "big") + bytes([1, 1, 0x11, 0])
    dht = bytes([0xFF, 0xC4, 0, 3 + 16 + 12, 0x00] + DC_BITS + list(range(12)))
    sos = bytes([0xFF, 0xDA, 0, 8, 1, 1, 0x00, 1, 0, 0])  # Ss = predictor 1, Se = 0, Ah/Al = Pt = 0
    return b"\xff\xd8" + sof + dht + sos + data + b"\xff\xd9"


def write_us(path, frames, syntax):
    """An ultrasound DICOM (MONOCHROME2, 8 bit) whose frames are encapsulated JPEG Lossless bitstreams."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import UltrasoundMultiFrameImageStorage, generate_uid
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.SOPClassUID, ds.SOPInstanceUID = UltrasoundMultiFrameImageStorage, generate_uid()
    ds.Modality = "US"
    ds.Rows, ds.Columns = frames[0].shape
    ds.NumberOfFrames = len(frames)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = encapsulate([jpeg_lossless(f) for f in frames])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)


@pytest.fixture
def echo_frames():
    cine = pydicom.examples.get_path("ybr_color")
    return [D.read_dicom(str(cine), k)[0].round().astype(np.uint8) for k in (0, 12)]  # (240, 320) each


@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.57"])
def test_jpeg_lossless_ultrasound_decodes(tmp_path, echo_frames, syntax):
    path = str(tmp_path / "lossless.dcm")
    write_us(path, echo_frames, syntax)
    assert D.read_dicom(path, count=True) == 2
    for k, ref in enumerate(echo_frames):
        g, colour = D.read_dicom(path, k)
        assert colour is None and np.array_equal(g, ref.astype(np.float32))  # lossless: exact
    img, fan = D.load_image(path, 96, frame=1)
    assert img.shape == fan.shape == (1, 96, 96) and 0.1 < fan.float().mean() < 0.5


def test_jpeg_ls_and_jpeg2000_decode():
    """pydicom's own JPEG-LS and JPEG 2000 lossless test files (MR, the codecs are what matters) read as the
    uncompressed original."""
    from pydicom.data import get_testdata_file
    ref = D.read_dicom(get_testdata_file("MR_small.dcm"))[0]
    for name in ("MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm"):
        assert np.array_equal(D.read_dicom(get_testdata_file(name))[0], ref), name


def test_undecodable_frames_are_skipped_and_counted(tmp_path, echo_frames, capsys):
    """A file in a syntax no installed plugin decodes (here MPEG2, which pydicom never decodes): the error names
    the syntax and its UID; usable() skips it and counts it beside the good one."""
    good, bad = str(tmp_path / "good.dcm"), str(tmp_path / "bad.dcm")
    write_us(good, echo_frames[:1], "1.2.840.10008.1.2.4.70")
    write_us(bad, echo_frames[:1], "1.2.840.10008.1.2.4.100")
    with pytest.raises(D.UserError) as e:
        D.read_dicom(bad)
    assert "(transfer syntax MPEG2 Main Profile / Main Level 1.2.840.10008.1.2.4.100)" in str(e.value)
    assert len(str(e.value).splitlines()) == 1
    assert D.usable([(good, None), (bad, None)], max_bad=0.5, min_side=16) == [(good, None)]
    out = capsys.readouterr().out
    assert "skipping 1 of 2" in out and "bad.dcm" in out
