"""Where a GPU-decode worker's time goes, per image, for batches of the bench's load (the cat photo):
the stages of `Classifier.decode` and `finish` timed apart, then the two stages run on two threads
(what `--overlap` does in one worker) against one thread. Issue 16's question: is the 0.35 ms per
image the GPU-decode pipeline spends beyond the model the CPU's calls, nvJPEG, or the resize?

    python scripts/gpu-decode-profile.py [--model mambaout_base] [--batch 64] [--seconds 3]

On a CPU it runs the same path with torchvision's CPU decoder (a rehearsal; fp32, tiny model)."""

from __future__ import annotations

import argparse
import queue
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torchvision.io import decode_jpeg

from timmserve.model.classifier import build_classifier
from timmserve.model.decode import open_checked
from timmserve.model.labels import load_labels
from timmserve.model.preprocess import DeviceJpegDecoder
from timmserve.model.types import ImageRequest
from timmserve.settings.config import ServeConfig

CAT = Path(__file__).resolve().parent.parent / "tests" / "data" / "cat.jpg"


def timed(step: Callable[[], object], sync: Callable[[], None], seconds: float) -> float:
    """Seconds per call: one warm-up call, then calls for `seconds`, the device synchronised."""
    step()
    sync()
    calls, start = 0, time.perf_counter()
    while calls == 0 or time.perf_counter() - start < seconds:
        step()
        sync()
        calls += 1
    return (time.perf_counter() - start) / calls


def two_threads(decode: Callable[[], object], finish: Callable[[object], object], seconds: float) -> int:
    """Batches finished in `seconds` with decode on one thread, one batch ahead, and finish on this one."""
    ahead: queue.Queue[object] = queue.Queue(maxsize=1)
    stop = threading.Event()

    def produce() -> None:
        while not stop.is_set():
            ahead.put(decode())

    threading.Thread(target=produce, daemon=True).start()
    finish(ahead.get())
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        finish(ahead.get())
        done += 1
    stop.set()
    ahead.get()  # let the producer see the stop
    return done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: mambaout_base on CUDA, test_efficientnet on a CPU")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    warnings.simplefilter("ignore", DeprecationWarning)  # torchvision's decoders (see DeviceJpegDecoder)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    config = ServeConfig(
        model=args.model or ("mambaout_base" if cuda else "test_efficientnet"),
        random_weights=True,
        max_batch_size=args.batch,
        precision="fp16" if cuda else "fp32",
        backend="eager",
        fast_decode=True,
        decode_threads=4,
        gpu_decode=cuda,
    )
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    data = CAT.read_bytes()
    encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8)]
    if cuda:
        torch.zeros(1, device=device)
        sync()
        for call in ("first", "second"):
            start = time.perf_counter()
            decode_jpeg(encoded, device=device)
            sync()
            print(f"nvJPEG {call} call, one image: {(time.perf_counter() - start) * 1e3:.1f} ms")

    classifier, info = build_classifier(config, load_labels(1000), device)
    if classifier.device_decoder is None:  # the CPU rehearsal: the same path, torchvision's CPU decoder
        classifier.device_decoder = DeviceJpegDecoder(classifier.preprocessor, device)
    decoder = classifier.device_decoder
    images = [data] * args.batch
    requests = [ImageRequest(data, 5) for _ in images]
    limits = {"max_pixels": classifier.preprocessor.max_pixels}
    decoded = decode_jpeg(encoded * args.batch, device=device)
    uint8_batch = torch.stack([classifier.preprocessor(data)] * args.batch)

    stages = {
        "header check (PIL open, EXIF, scan count)": lambda: [open_checked(d, **limits) for d in images],
        "decode_jpeg, one call": lambda: decode_jpeg(encoded * args.batch, device=device),
        "resize + crop, one call": lambda: classifier.preprocessor.tensor_transform(torch.stack(decoded)),
        "DeviceJpegDecoder (the three above)": lambda: decoder(images),
        "Classifier.decode (stage 1)": lambda: classifier.decode(requests),
        "model: probabilities of a uint8 batch": lambda: classifier.probabilities(uint8_batch),
        "Classifier.classify (stage 1 + 2)": lambda: classifier.classify(requests),
    }
    print(f"{config.model} on {device}, batch {args.batch} of {CAT.name}, {args.seconds:g} s per stage")
    per_image = {}
    for name, step in stages.items():
        per_image[name] = timed(step, sync, args.seconds) / args.batch
        print(f"  {per_image[name] * 1e3:7.3f} ms/img  {1 / per_image[name]:8.0f} img/s  {name}")
    batches = two_threads(lambda: classifier.decode(requests), classifier.finish, args.seconds)
    rate = batches * args.batch / args.seconds
    print(f"  two threads, decode one batch ahead: {rate:8.0f} img/s")
    print(f"  model alone: {1 / per_image['model: probabilities of a uint8 batch']:8.0f} img/s")


if __name__ == "__main__":
    main()
