"""The seeded workload of `npuserve bench serve`: prompt texts in English and Chinese, output
lengths, and Poisson arrival times.

Request i of level k is drawn from its own generator (seed, k, i), so a level's requests are
the same however many of them a run reaches, and no two levels share a prompt (a repeated
prompt would hit the worker's prefix cache). Prompts are text, tokenized by the gateway;
their length in tokens is aimed at through each language's measured tokens per word (see
`calibrate`), so it lands near the drawn length rather than on it; the results report the
prompt tokens the gateway counted. Outputs have exact lengths: max_tokens with EOS ignored.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

LENGTH_DISTRIBUTIONS = ("fixed", "uniform", "lognormal")

ENGLISH = (
    "the quick system reads every request and answers in order while the model thinks about "
    "a long story of rivers mountains cities and people who travel across the sea to find "
    "new work better food quiet places bright ideas simple tools and old friends it was late "
    "in the evening when the small team finished their report on energy markets weather "
    "patterns school budgets train schedules and the history of music please explain why "
    "this happens how it works what we should change next and which numbers matter most"
).split()
CHINESE = (
    "我们 今天 讨论 一个 问题 为什么 城市 的 交通 越来越 拥挤 请 用 简单 的 语言 解释 "
    "人工智能 如何 改变 教育 医疗 和 工作 方式 他们 在 山上 看到 美丽 的 风景 河流 森林 "
    "和 村庄 这个 模型 需要 更多 数据 才能 回答 准确 明天 的 天气 可能 下雨 历史 文化 "
    "经济 发展 科学 技术 音乐 电影 朋友 家庭 学习 旅行 你好 介绍 一下 你自己"
).split()
WORDS = {"en": ENGLISH, "zh": CHINESE}
JOINER = {"en": " ", "zh": ""}


@dataclass(frozen=True, slots=True)
class LoadRequest:
    """One request of a level: what the load generator sends."""

    index: int
    prompt: str
    language: str
    """"en" or "zh"."""
    target_input_len: int
    """Prompt tokens aimed at (the gateway's count may differ a little)."""
    output_len: int
    """max_tokens, with EOS ignored: the exact number of tokens the stream carries."""


@dataclass(frozen=True, slots=True)
class WorkloadSpec:
    input_len: int = 128
    output_len: int = 64
    distribution: str = "uniform"
    """fixed; uniform over [len x (1 - spread), len x (1 + spread)]; lognormal with median
    len and sigma = spread (clipped to [1, 4 x len])."""
    spread: float = 0.5
    zh_fraction: float = 0.3
    """Share of prompts in Chinese."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.distribution not in LENGTH_DISTRIBUTIONS:
            raise ValueError(f"distribution must be one of {', '.join(LENGTH_DISTRIBUTIONS)}")
        if self.input_len < 1 or self.output_len < 1 or self.spread < 0:
            raise ValueError("input_len and output_len must be >= 1, spread >= 0")
        if not 0 <= self.zh_fraction <= 1:
            raise ValueError("zh_fraction must be in [0, 1]")


def draw_length(rng: random.Random, mean: int, distribution: str, spread: float) -> int:
    """One length around `mean` (>= 1)."""
    if distribution == "fixed":
        return mean
    if distribution == "uniform":
        lo, hi = max(1, round(mean * (1 - spread))), max(1, round(mean * (1 + spread)))
        return rng.randint(lo, hi)
    value = mean * math.exp(rng.gauss(0.0, spread))
    return min(max(1, round(value)), 4 * mean)


def poisson_arrivals(rate: float, duration_s: float, seed: int) -> list[float]:
    """Seconds from the start at which requests arrive at `rate` per second on average
    (exponential gaps), up to `duration_s`."""
    if rate <= 0:
        raise ValueError("rate must be > 0")
    rng = random.Random(f"arrivals-{seed}")
    times, t = [], rng.expovariate(rate)
    while t < duration_s:
        times.append(t)
        t += rng.expovariate(rate)
    return times


class Workload:
    """Requests by (level, index), drawn on demand."""

    def __init__(self, spec: WorkloadSpec, tokens_per_word: dict[str, float] | None = None
                 ) -> None:
        self.spec = spec
        self.tokens_per_word = tokens_per_word or {"en": 1.3, "zh": 1.5}
        """Prompt tokens per word in each language, as the gateway's tokenizer counts."""

    def request(self, level: int, index: int) -> LoadRequest:
        s = self.spec
        rng = random.Random(f"{s.seed}-{level}-{index}")
        language = "zh" if rng.random() < s.zh_fraction else "en"
        input_len = draw_length(rng, s.input_len, s.distribution, s.spread)
        output_len = draw_length(rng, s.output_len, s.distribution, s.spread)
        words = max(1, round(input_len / self.tokens_per_word[language]))
        return LoadRequest(index, text(rng, language, words), language, input_len, output_len)


def text(rng: random.Random, language: str, words: int) -> str:
    """`words` words of `language` in seeded order, starting anywhere in the word list."""
    pool = WORDS[language]
    start = rng.randrange(len(pool))
    picked = [pool[(start + i) % len(pool)] if rng.random() < 0.7 else rng.choice(pool)
              for i in range(words)]
    return JOINER[language].join(picked)


def calibrate(tokenize: Callable[[str], int], samples: int = 8, words: int = 64,
              seed: int = 0) -> dict[str, float]:
    """Tokens per word of each language, from `samples` texts of `words` words counted by
    `tokenize` (the gateway's Tokenize)."""
    rng = random.Random(f"calibrate-{seed}")
    out = {}
    for language in WORDS:
        counts = [tokenize(text(rng, language, words)) for _ in range(samples)]
        out[language] = max(sum(counts) / (samples * words), 1e-3)
    return out
