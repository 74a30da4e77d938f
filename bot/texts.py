"""Every user-visible string, in English and Chinese, looked up by key.

Both catalogs hold the same keys (a test fails otherwise). Texts are plain: adapters escape them
for their markup. A missing parameter renders as `?` instead of raising, so a typo in a
parameter name can never turn an answer into a crash.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from typing import Any

from bot.errors import UserError

LANGS = ("en", "zh")

EN: dict[str, str] = {
    # ---- job status ----
    "status.queued": "🕒 Queued #{position} · {model} ×{n} · job {job}",
    "status.started": "🎨 Generating with {model}… · job {job}",
    "status.progress": "🎨 Generating… {percent}% · job {job}",
    "status.cancelled": "✖ Cancelled · job {job} · not charged",
    "status.refused": "🚫 The provider refused this prompt: {reason} · job {job} · not charged",
    "status.timeout": "⏱ Timed out · job {job} · not charged",
    "status.failed": "⚠ Failed: {reason} · job {job} · not charged",
    "status.delivered": "✅ Done · job {job}",
    # ---- failure reasons, one per error kind ----
    "reason.refused": "the request was blocked by the provider's safety filter",
    "reason.rate_limited": "the image service is busy, please try again in a minute",
    "reason.transient": "the image service had a temporary problem",
    "reason.auth": "the image service is temporarily unavailable",
    "reason.bad_request": "the image service did not accept these settings",
    "reason.expired": "the result expired before it could be fetched",
    "reason.timeout": "it took too long",
    "reason.cancelled": "it was cancelled",
    "reason.internal": "something went wrong on our side",
    "reason.queue_timeout": "it waited too long in the queue",
    # ---- errors answered at once ----
    "error.generic": "Something went wrong. Please try again.",
    "error.invalid": "That request is not valid.",
    "error.not_allowed": "Sorry, this bot is not open to you here.",
    "error.queue_full": "The queue is full right now. Please try again in a few minutes.",
    "error.too_many_pending": "You already have {max} jobs waiting. Wait for one to finish, or /cancel one.",
    "error.quota_images": "You have used {used} of your {limit} images today. The limit resets tomorrow.",
    "error.quota_usd": "You have used ${used} of your ${limit} for today. The limit resets tomorrow.",
    "error.budget": "The bot has reached its spending limit for today. Please try again tomorrow.",
    "error.job_not_found": "No job {job} of yours was found. See /jobs.",
    "error.job_finishing": "Job {job} is finishing and can no longer be cancelled.",
    "error.no_active_job": "You have no queued or running job to cancel.",
    "error.shutting_down": "The bot is restarting. Please try again in a minute.",
    "error.empty_prompt": "Please describe the image, e.g. /imagine a lighthouse at dusk --ar 16:9",
    "error.prompt_too_long": "That prompt has {length} characters; the limit is {max}.",
    "error.unknown_model": "There is no model called {model}. See /models.",
    "error.model_unavailable": "The model {model} is not available on this bot. See /models.",
    "error.too_many_images": "{model} makes 1 to {max} images per request, not {value}.",
    "error.ratio_not_supported": "{model} does not do aspect ratio {value}. It does: {allowed}.",
    "error.size_not_supported": "{model} does not do size {value}. It does: {allowed}.",
    "error.bad_seed": "The seed must be a whole number from 0 to 4294967295, not {value}.",
    "error.refs_not_supported": "{model} does not take reference images.",
    "error.too_many_refs": "{model} takes at most {max} reference images.",
    "error.reference_unreadable": "That attachment is not a PNG, JPEG or WebP image I can read.",
    "error.unknown_command": "I don't know /{command}. See /help.",
    "error.unknown_option": "I don't know the option {option}. Options: --ar --n --model --size --seed",
    "error.option_needs_value": "The option {option} needs a value, e.g. --ar 16:9",
    "error.bad_count": "--n takes a number from 1 to {max}, not {value}.",
    "error.bad_aspect_ratio": "--ar takes a ratio like 16:9, not {value}.",
    # ---- command answers ----
    "help": (
        "/imagine <prompt> — make an image (also /img, /draw)\n"
        "  options: --ar 16:9  --n 2  --model NAME  --size 2K  --seed 42\n"
        "/usage — what you have used today\n"
        "/jobs — your recent jobs\n"
        "/cancel [job] — cancel your latest (or that) job\n"
        "/models — the models you can use\n"
        "/settings — your defaults\n"
        "/help — this text"
    ),
    "start": "Hi! I turn your words into images. Try: /imagine a lighthouse at dusk --ar 16:9",
    "usage.summary": (
        "Today: {images} of {image_limit} images · spent {spend} of {spend_limit} · "
        "{jobs} job(s) in progress"
    ),
    "usage.unlimited": "unlimited",
    "jobs.header": "Your recent jobs:",
    "jobs.empty": "You have no jobs yet. Try /imagine.",
    "jobs.line": "{job} · {status} · {model} · {prompt}",
    "cancel.done": "✖ Job {job} cancelled, not charged.",
    "models.header": "Models (price per image · aspect ratios):",
    "models.line": "{name} · {price} · {ratios}",
    "settings.summary": "Default model: {model} · language: {lang}",
    "caption": "{prompt}\n{model} · seed {seed} · job {job}",
    "delivered.saved": "✅ Job {job} done. Saved:{paths}",
    "batch.summary": "{images} image(s), {failures} failure(s), cost {cost}, {seconds} s",
    "console.welcome": (
        "drawbridge console · model {model} · type /help, or /quit to leave.\n"
        "Try: /imagine a lighthouse --n 2 --ar 16:9"
    ),
}

ZH: dict[str, str] = {
    "status.queued": "🕒 排队第 {position} 位 · {model} ×{n} · 任务 {job}",
    "status.started": "🎨 正在用 {model} 生成… · 任务 {job}",
    "status.progress": "🎨 生成中… {percent}% · 任务 {job}",
    "status.cancelled": "✖ 已取消 · 任务 {job} · 未扣费",
    "status.refused": "🚫 服务商拒绝了这个提示词：{reason} · 任务 {job} · 未扣费",
    "status.timeout": "⏱ 超时 · 任务 {job} · 未扣费",
    "status.failed": "⚠ 失败：{reason} · 任务 {job} · 未扣费",
    "status.delivered": "✅ 完成 · 任务 {job}",
    "reason.refused": "请求被服务商的安全过滤拦截",
    "reason.rate_limited": "图像服务繁忙，请一分钟后再试",
    "reason.transient": "图像服务出现临时故障",
    "reason.auth": "图像服务暂时不可用",
    "reason.bad_request": "图像服务不接受这些设置",
    "reason.expired": "结果在取回之前已过期",
    "reason.timeout": "耗时过长",
    "reason.cancelled": "已被取消",
    "reason.internal": "我们这边出了问题",
    "reason.queue_timeout": "在队列中等待太久",
    "error.generic": "出错了，请再试一次。",
    "error.invalid": "这个请求无效。",
    "error.not_allowed": "抱歉，这个机器人在这里不对你开放。",
    "error.queue_full": "队列已满，请几分钟后再试。",
    "error.too_many_pending": "你已有 {max} 个任务在等待。请等其中一个完成，或用 /cancel 取消。",
    "error.quota_images": "你今天已用 {used}/{limit} 张图，明天重置。",
    "error.quota_usd": "你今天已花费 ${used}/${limit}，明天重置。",
    "error.budget": "机器人今天的预算已用完，请明天再试。",
    "error.job_not_found": "没有找到你的任务 {job}。见 /jobs。",
    "error.job_finishing": "任务 {job} 即将完成，已无法取消。",
    "error.no_active_job": "你没有排队或进行中的任务可以取消。",
    "error.shutting_down": "机器人正在重启，请一分钟后再试。",
    "error.empty_prompt": "请描述你想要的图片，例如 /imagine 黄昏的灯塔 --ar 16:9",
    "error.prompt_too_long": "提示词有 {length} 个字符，上限是 {max}。",
    "error.unknown_model": "没有名为 {model} 的模型。见 /models。",
    "error.model_unavailable": "本机器人未提供模型 {model}。见 /models。",
    "error.too_many_images": "{model} 每次可生成 1 到 {max} 张图，不能是 {value}。",
    "error.ratio_not_supported": "{model} 不支持宽高比 {value}。支持：{allowed}。",
    "error.size_not_supported": "{model} 不支持尺寸 {value}。支持：{allowed}。",
    "error.bad_seed": "种子必须是 0 到 4294967295 之间的整数，不能是 {value}。",
    "error.refs_not_supported": "{model} 不接受参考图。",
    "error.too_many_refs": "{model} 最多接受 {max} 张参考图。",
    "error.reference_unreadable": "这个附件不是我能读取的 PNG、JPEG 或 WebP 图片。",
    "error.unknown_command": "我不认识 /{command}。见 /help。",
    "error.unknown_option": "我不认识选项 {option}。可用选项：--ar --n --model --size --seed",
    "error.option_needs_value": "选项 {option} 需要一个值，例如 --ar 16:9",
    "error.bad_count": "--n 需要 1 到 {max} 之间的数字，不能是 {value}。",
    "error.bad_aspect_ratio": "--ar 需要像 16:9 这样的比例，不能是 {value}。",
    "help": (
        "/imagine <提示词> — 生成图片（也可用 /img、/draw）\n"
        "  选项：--ar 16:9  --n 2  --model 模型名  --size 2K  --seed 42\n"
        "/usage — 今天的用量\n"
        "/jobs — 最近的任务\n"
        "/cancel [任务] — 取消最近（或指定）的任务\n"
        "/models — 可用的模型\n"
        "/settings — 你的默认设置\n"
        "/help — 本帮助"
    ),
    "start": "你好！我能把文字变成图片。试试：/imagine 黄昏的灯塔 --ar 16:9",
    "usage.summary": "今天：{images}/{image_limit} 张图 · 已花费 {spend}/{spend_limit} · 进行中 {jobs} 个任务",
    "usage.unlimited": "不限",
    "jobs.header": "你最近的任务：",
    "jobs.empty": "你还没有任务。试试 /imagine。",
    "jobs.line": "{job} · {status} · {model} · {prompt}",
    "cancel.done": "✖ 任务 {job} 已取消，未扣费。",
    "models.header": "模型（每张价格 · 宽高比）：",
    "models.line": "{name} · {price} · {ratios}",
    "settings.summary": "默认模型：{model} · 语言：{lang}",
    "caption": "{prompt}\n{model} · 种子 {seed} · 任务 {job}",
    "delivered.saved": "✅ 任务 {job} 完成。已保存：{paths}",
    "batch.summary": "{images} 张图，{failures} 个失败，花费 {cost}，用时 {seconds} 秒",
    "console.welcome": (
        "drawbridge 控制台 · 模型 {model} · 输入 /help，或 /quit 退出。\n"
        "试试：/imagine 灯塔 --n 2 --ar 16:9"
    ),
}

CATALOGS: Mapping[str, Mapping[str, str]] = {"en": EN, "zh": ZH}


class _Params(dict[str, Any]):
    def __missing__(self, key: str) -> str:
        return "?"


_formatter = string.Formatter()


def pick_lang(code: str | None) -> str:
    """`zh`, `zh-CN`, `zh_TW`, `zh-hans` → zh; anything else → en."""
    if code and code.strip().lower().replace("_", "-").split("-")[0] == "zh":
        return "zh"
    return "en"


def t(lang: str, key: str, /, **params: Any) -> str:
    """The text for `key` in `lang` (English when either is missing), with `params` filled in."""
    catalog = CATALOGS.get(lang, EN)
    template = catalog.get(key) or EN.get(key)
    if template is None:
        return key
    try:
        return _formatter.vformat(template, (), _Params(params))
    except (ValueError, IndexError, AttributeError, KeyError):
        return template


def render_error(lang: str, exc: UserError) -> str:
    return t(lang, exc.key, **exc.params)
