"""A streaming request the fake provider holds open until the test lets it end."""

from __future__ import annotations

import threading
import uuid

import openai

from tests.conftest import Stack


class GatedStream:
    """A streaming chat completion held open by the fake provider until ``finish``."""

    def __init__(
        self, stack: Stack, c: openai.OpenAI, model: str = "gpt-4o-mini", **kw: object
    ) -> None:
        self.provider = stack.provider
        self.gate = f"gate-{uuid.uuid4().hex[:8]}"
        self.error: BaseException | None = None
        self.stream = c.with_options(timeout=30).chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "hello spendgate"}],
            stream=True,
            extra_headers={"x-fake-gate": self.gate},
            **kw,  # type: ignore[call-overload]
        )
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for _ in self.stream:
                pass
        except BaseException as e:  # a cut stream, reported by finish()
            self.error = e

    def finish(self) -> BaseException | None:
        for _ in range(50):
            self.provider.open_gate(self.gate)
        self.thread.join(20)
        assert not self.thread.is_alive()
        return self.error
