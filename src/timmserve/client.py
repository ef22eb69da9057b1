"""A small client for a timmserve server (used by `timmserve classify`)."""

from __future__ import annotations

from pathlib import Path

import httpx

from timmserve.errors import ClientError
from timmserve.model.types import Prediction

DEFAULT_URL = "http://127.0.0.1:8000"


class Client:
    """Sends image files as raw bodies to `POST /predict`; keeps one connection open."""

    def __init__(self, url: str = DEFAULT_URL, *, timeout: float = 60.0, api_key: str | None = None) -> None:
        self.url = url.rstrip("/")
        headers = {"X-API-Key": api_key} if api_key else {}
        self._http = httpx.Client(base_url=self.url, timeout=timeout, headers=headers)

    def classify(self, image: bytes | Path, *, top_k: int | None = None) -> list[Prediction]:
        data = image.read_bytes() if isinstance(image, Path) else image
        params = {"top_k": top_k} if top_k is not None else {}
        try:
            response = self._http.post(
                "/predict", content=data, params=params, headers={"Content-Type": "application/octet-stream"}
            )
        except httpx.HTTPError as exc:
            raise ClientError(f"no answer from {self.url} ({type(exc).__name__}: {exc})") from None
        if response.status_code != 200:
            raise ClientError(f"{response.status_code}: {_detail(response)}", status_code=response.status_code)
        return [Prediction(p["label"], p["probability"]) for p in response.json()["predictions"]]

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _detail(response: httpx.Response) -> str:
    try:
        return str(response.json()["detail"])
    except (ValueError, KeyError, TypeError):
        return response.text.strip()[:200] or response.reason_phrase
