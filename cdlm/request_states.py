"""Per-request decoding state that lives on the device, one row per running `cdlm` request.

Rows hold what every step needs and what changes rarely: the page table (fixed at admission,
since a request reserves all its pages up front), the current block's tokens (updated on the
device by each step's decisions; reset to masks when a block opens), the sampling settings and
threshold, and, for Dream, the last committed token's hidden state (it predicts the first
position of the next block). The host uploads a row once, at admission, and afterwards sends
only the step's new information (cdlm.step_inputs). The last row is a dummy that padding
segments of a fixed-shape step point at: its pages are the pool's scratch pages and nothing in
it is ever decodable.
"""

from __future__ import annotations

from collections import deque

import torch

from cdlm.sampler import log_odds_threshold
from cdlm.sampling_params import SamplingParams


class RequestStates:
    def __init__(self, max_requests: int, block_size: int, max_pages: int, hidden_size: int,
                 mask_token_id: int, scratch_pages: list[int], hidden_dtype: torch.dtype,
                 device: torch.device) -> None:
        rows = max_requests + 1
        self.dummy_slot = max_requests
        self.block_size = block_size
        self.mask_token_id = mask_token_id
        self.device = device
        self.page_table = torch.zeros((rows, max_pages), dtype=torch.int32, device=device)
        scratch = (scratch_pages * max_pages)[:max_pages]
        self.page_table[self.dummy_slot] = torch.tensor(scratch, dtype=torch.int32)
        self.block = torch.full((rows, block_size), mask_token_id, dtype=torch.long,
                                device=device)                     # [rows, block]
        self.temperature = torch.zeros(rows, device=device)
        self.top_p = torch.ones(rows, device=device)
        self.top_k = torch.zeros(rows, dtype=torch.long, device=device)
        self.min_p = torch.zeros(rows, device=device)
        self.threshold = torch.zeros(rows, device=device)         # log-odds
        self.tokens_per_step = torch.zeros(rows, dtype=torch.long, device=device)
        self.saved_hidden = torch.zeros((rows, hidden_size), dtype=hidden_dtype, device=device)
        self._free: deque[int] = deque(range(max_requests))
        self._slot_of: dict[str, int] = {}

    def __contains__(self, seq_id: str) -> bool:
        return seq_id in self._slot_of

    def slot(self, seq_id: str) -> int:
        return self._slot_of[seq_id]

    def admit(self, seq_id: str, pages: list[int], params: SamplingParams,
              threshold: float) -> int:
        """Give a request a row and upload what stays fixed for its lifetime."""
        if not self._free:
            raise RuntimeError("more running cdlm requests than request-state rows")
        slot = self._free.popleft()
        self._slot_of[seq_id] = slot
        if len(pages) > self.page_table.shape[1]:
            raise ValueError("request has more pages than the page table is wide")
        self.page_table[slot, :len(pages)] = torch.tensor(pages, dtype=torch.int32)
        floats = torch.tensor([0.0 if params.greedy else params.temperature, params.top_p,
                               params.min_p, log_odds_threshold(threshold)])
        ints = torch.tensor([params.top_k, params.tokens_per_step or 0])
        floats, ints = floats.to(self.device), ints.to(self.device)
        self.temperature[slot], self.top_p[slot] = floats[0], floats[1]
        self.min_p[slot], self.threshold[slot] = floats[2], floats[3]
        self.top_k[slot], self.tokens_per_step[slot] = ints[0], ints[1]
        return slot

    def release(self, seq_id: str) -> None:
        slot = self._slot_of.pop(seq_id, None)
        if slot is not None:
            self._free.append(slot)

    def restore_block(self, seq_id: str, block: list[int]) -> None:
        """Overwrite a row's block with the host's copy (after a failed step, whose partial
        device-side updates must not survive)."""
        self.block[self._slot_of[seq_id]] = torch.tensor(block, dtype=torch.long).to(self.device)
