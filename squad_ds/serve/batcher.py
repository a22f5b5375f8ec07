"""Requests that arrive together are answered in one model call; one that fails never fails the others."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field


@dataclass
class _Pending:
    question: str
    context: str
    top_k: int
    done: asyncio.Future = field(repr=False)


class Batcher:
    """Answers queued questions in batches: the first waits `window_s` for others, then up to `max_batch` run in one
    `answer_many` call, off the event loop. When a batch fails, each of its questions is asked alone, so each gets
    its own answer or error."""

    def __init__(self, qa, max_batch: int = 64, window_s: float = 0.005):
        self.qa, self.max_batch, self.window_s = qa, max_batch, window_s
        self.queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self.batches = self.answered = 0

    async def ask(self, question: str, context: str, top_k: int) -> list:
        item = _Pending(question, context, top_k, asyncio.get_running_loop().create_future())
        await self.queue.put(item)
        return await item.done

    async def run(self) -> None:
        while True:
            items = [await self.queue.get()]
            await asyncio.sleep(self.window_s)
            while not self.queue.empty() and len(items) < self.max_batch:
                items.append(self.queue.get_nowait())
            outcomes = await asyncio.to_thread(self._answer, items)
            self.batches += 1
            for i, outcome in zip(items, outcomes):
                if i.done.done():  # the request went away (its client left, or shutdown cancelled it)
                    continue
                if isinstance(outcome, BaseException):
                    i.done.set_exception(outcome)
                else:
                    self.answered += 1
                    i.done.set_result(outcome[:i.top_k])

    def _answer(self, items: list[_Pending]) -> list:
        """Each item's answers, or the exception it raised (in the worker thread)."""
        try:
            return self.qa.answer_many([i.question for i in items], [i.context for i in items],
                                       top_k=max(i.top_k for i in items))
        except Exception as e:  # noqa: BLE001 - handed to the request(s) it belongs to
            if len(items) == 1:
                return [e]
        outcomes: list = []
        for i in items:
            try:
                outcomes.append(self.qa.answer_many([i.question], [i.context], top_k=i.top_k)[0])
            except Exception as e:  # noqa: BLE001
                outcomes.append(e)
        return outcomes
