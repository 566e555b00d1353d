"""teacher-sim's OpenAI Files and Batch API: uploads, batches, their status over time, results.

A batch moves validating -> in_progress -> finalizing -> completed on the clock (status is
computed whenever it is asked for): its lines finish evenly over ``batch_delay_s``. With
``batch_expire_s`` a batch still running at that age ends ``expired``; ``POST .../cancel`` makes
it ``cancelling`` then ``cancelled``. Either way the lines finished by then are in the output file
and the others in the error file with code ``batch_expired`` / ``batch_cancelled``, as OpenAI
does. ``batch_line_error_rate`` fails lines on purpose (a 500 in the error file), drawn per
(batch, line) so that a resubmitted line gets a fresh draw. Results are computed once, when the
batch ends, by the same `Responder` as the synchronous routes, so a batch answer is the answer.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from typing import Any, Optional

from .sources import BadRequest, Responder, error_body, rng_for
from .stats import SimStats

ENDPOINTS = ("/v1/completions", "/v1/chat/completions")
TERMINAL = ("completed", "failed", "expired", "cancelled")
PUBLIC = ("id", "object", "endpoint", "errors", "input_file_id", "completion_window", "status", "output_file_id",
          "error_file_id", "created_at", "in_progress_at", "expires_at", "finalizing_at", "completed_at", "failed_at",
          "expired_at", "cancelling_at", "cancelled_at", "request_counts", "metadata")


def _new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:24]}"


class Files:
    """Uploaded and generated files, in memory."""

    def __init__(self) -> None:
        self.meta: dict[str, dict] = {}
        self.content: dict[str, bytes] = {}

    def add(self, filename: str, purpose: str, content: bytes) -> dict:
        fid = _new_id("file-")
        self.meta[fid] = {"id": fid, "object": "file", "bytes": len(content), "created_at": int(time.time()),
                          "filename": filename, "purpose": purpose, "status": "processed"}
        self.content[fid] = content
        return self.meta[fid]

    def delete(self, fid: str) -> bool:
        self.content.pop(fid, None)
        return self.meta.pop(fid, None) is not None


class Batches:
    def __init__(self, settings: Any, files: Files, responder: Responder, stats: SimStats):
        self.s, self.files, self.responder, self.stats = settings, files, responder, stats
        self.batches: dict[str, dict] = {}
        self.lines: dict[str, list[dict]] = {}
        self.line_ids = 0

    # ------------------------------------------------------------------ routes

    def create(self, req: dict) -> tuple[int, dict]:
        fid, endpoint = req.get("input_file_id"), req.get("endpoint")
        if fid not in self.files.content:
            return 404, error_body(f"no such file: {fid}")
        if endpoint not in ENDPOINTS:
            return 400, error_body(f"endpoint must be one of {', '.join(ENDPOINTS)}, got {endpoint!r}")
        now = time.time()
        bid = _new_id("batch_")
        lines, errors = self._parse(self.files.content[fid], endpoint)
        b = {"id": bid, "object": "batch", "endpoint": endpoint, "errors": None, "input_file_id": fid,
             "completion_window": req.get("completion_window", "24h"), "status": "validating",
             "output_file_id": None, "error_file_id": None, "created_at": int(now), "in_progress_at": None,
             "expires_at": int(now + 86400), "finalizing_at": None, "completed_at": None, "failed_at": None,
             "expired_at": None, "cancelling_at": None, "cancelled_at": None,
             "request_counts": {"total": len(lines), "completed": 0, "failed": 0}, "metadata": req.get("metadata"),
             "_t0": now, "_cancel_at": None, "_ended": False}
        if errors:
            b.update(status="failed", failed_at=int(now), _ended=True,
                     errors={"object": "list", "data": errors})
        else:
            self.stats.batches_created += 1
            for line in lines:
                self.stats.batch_lines[line["custom_id"]] += 1
        self.batches[bid], self.lines[bid] = b, lines
        return 200, self.public(b)

    def get(self, bid: str) -> tuple[int, dict]:
        b = self.batches.get(bid)
        if b is None:
            return 404, error_body(f"no such batch: {bid}")
        self.advance(b)
        return 200, self.public(b)

    def list(self, after: Optional[str], limit: int) -> tuple[int, dict]:
        ordered = sorted(self.batches.values(), key=lambda b: b["_t0"], reverse=True)  # newest first, like OpenAI
        if after in self.batches:
            ordered = ordered[[b["id"] for b in ordered].index(after) + 1:]
        page = ordered[:limit]
        for b in page:
            self.advance(b)
        return 200, {"object": "list", "data": [self.public(b) for b in page],
                     "first_id": page[0]["id"] if page else None, "last_id": page[-1]["id"] if page else None,
                     "has_more": len(ordered) > len(page)}

    def cancel(self, bid: str) -> tuple[int, dict]:
        b = self.batches.get(bid)
        if b is None:
            return 404, error_body(f"no such batch: {bid}")
        self.advance(b)
        if b["status"] in TERMINAL or b["status"] == "cancelling":
            return 409, error_body(f"batch {bid} is {b['status']}: it cannot be cancelled")
        b["_cancel_at"] = time.time()
        b["cancelling_at"] = int(b["_cancel_at"])
        self.advance(b)
        return 200, self.public(b)

    def summary(self) -> dict:
        for b in self.batches.values():
            self.advance(b)
        by_status: dict[str, int] = {}
        for b in self.batches.values():
            by_status[b["status"]] = by_status.get(b["status"], 0) + 1
        return {"count": len(self.batches), "by_status": by_status}

    # ------------------------------------------------------------------ the clock

    def _times(self, b: dict) -> tuple[float, float, float]:
        """(in_progress from, finalizing from, completed at) for batch `b`."""
        step = min(0.1, self.s.batch_delay_s / 10)
        start = b["_t0"] + step
        return start, start + self.s.batch_delay_s, start + self.s.batch_delay_s + step

    def _done_at(self, b: dict, i: int) -> float:
        start, end, _ = self._times(b)
        n = max(1, len(self.lines[b["id"]]))
        return start + (end - start) * (i + 1) / n

    def advance(self, b: dict, now: Optional[float] = None) -> None:
        if b["_ended"]:
            return
        now = now or time.time()
        start, finalizing, completed = self._times(b)
        expire = b["_t0"] + self.s.batch_expire_s if self.s.batch_expire_s else math.inf
        cancel = b["_cancel_at"] if b["_cancel_at"] is not None else math.inf
        stop = min(expire, cancel)
        if stop < completed and now >= stop:  # cancelled (after a moment of "cancelling") or expired
            if stop == cancel and now < cancel + min(0.1, self.s.batch_delay_s / 10):
                b["status"] = "cancelling"
                return
            reason = "cancelled" if stop == cancel else "expired"
            return self._end(b, reason, stop, now)
        if now >= completed:
            return self._end(b, "completed", math.inf, now)
        if now >= finalizing:
            b.update(status="finalizing", finalizing_at=b["finalizing_at"] or int(now))
        elif now >= start:
            b.update(status="in_progress", in_progress_at=b["in_progress_at"] or int(now))
        done = sum(1 for i in range(len(self.lines[b["id"]])) if self._done_at(b, i) <= now)
        b["request_counts"]["completed"] = done

    def _end(self, b: dict, status: str, stop: float, now: float) -> None:
        out, err = [], []
        for i, line in enumerate(self.lines[b["id"]]):
            if self._done_at(b, i) > stop:
                code = "batch_expired" if status == "expired" else "batch_cancelled"
                err.append(self._line(line, None, {"code": code, "message": f"request not run: the batch was {status}"}))
                continue
            status_code, body = self._answer(b, line)
            (out if status_code == 200 else err).append(self._line(line, {"status_code": status_code, "body": body}, None))
        if out:
            b["output_file_id"] = self.files.add(f"{b['id']}_output.jsonl", "batch_output", _jsonl(out))["id"]
        if err:
            b["error_file_id"] = self.files.add(f"{b['id']}_error.jsonl", "batch_output", _jsonl(err))["id"]
        b["request_counts"].update(completed=sum(1 for x in out), failed=len(err))
        b.update(status=status, _ended=True, **{f"{status}_at": int(now)})

    def _answer(self, b: dict, line: dict) -> tuple[int, dict]:
        if rng_for(self.s.seed, b["id"], line["custom_id"]).random() < self.s.batch_line_error_rate:
            self.stats.faults["batch_line"] += 1
            return 500, error_body("The server had an error processing this line (simulated).", "server_error")
        try:
            body, keys, prompt = self.responder.respond(b["endpoint"].endswith("chat/completions"), line["body"])
        except BadRequest as e:
            return 400, error_body(str(e))
        self.stats.answered(keys, prompt)
        return 200, body

    def _line(self, line: dict, response: Optional[dict], error: Optional[dict]) -> dict:
        self.line_ids += 1
        if response is not None:
            response = {"status_code": response["status_code"], "request_id": f"req_sim{self.line_ids}",
                        "body": response["body"]}
        return {"id": f"batch_req_sim{self.line_ids}", "custom_id": line["custom_id"], "response": response,
                "error": error}

    # ------------------------------------------------------------------ input

    @staticmethod
    def _parse(content: bytes, endpoint: str) -> tuple[list[dict], list[dict]]:
        lines, errors, seen = [], [], set()
        for n, raw in enumerate(content.decode("utf-8", "replace").splitlines(), 1):
            if not raw.strip():
                continue
            try:
                line = json.loads(raw)
                cid, url, body = line["custom_id"], line.get("url"), line["body"]
                if not isinstance(cid, str) or not isinstance(body, dict):
                    raise TypeError("custom_id must be a string and body an object")
            except (ValueError, KeyError, TypeError) as e:
                errors.append({"code": "invalid_request", "message": f"line {n}: {e}", "param": None, "line": n})
                continue
            if url != endpoint:
                errors.append({"code": "mismatched_endpoint", "message": f"line {n}: url {url!r} is not the batch's "
                               f"endpoint {endpoint!r}", "param": "url", "line": n})
            if cid in seen:
                errors.append({"code": "duplicate_custom_id", "message": f"line {n}: custom_id {cid!r} repeats",
                               "param": "custom_id", "line": n})
            seen.add(cid)
            lines.append(line)
        return lines, errors

    @staticmethod
    def public(b: dict) -> dict:
        return {k: b[k] for k in PUBLIC}


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()

