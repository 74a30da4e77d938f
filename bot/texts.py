"""Every user-visible string, in English and Chinese, looked up by key.

Both catalogs hold the same keys (a test fails otherwise). Texts are plain: adapters escape them
for their markup, whole or (where the catalog's words must stay as written) only the values a
user typed, as they go in. A missing parameter renders as `?` instead of raising, so a typo in a
parameter name can never turn an answer into a crash.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any

from bot.commands import shorten
from bot.errors import Listed, UserError

LANGS = ("en", "zh")

EN: dict[str, str] = {
    # ---- job status ----
    "status.queued": "🕒 Queued #{position} · {model} ×{n} · job {job}",
    "status.queued_priced": "🕒 Queued #{position} · {model} ×{n} · {price} · job {job}",
    "status.started": "🎨 Generating with {model}… · job {job}",
    "status.progress": "🎨 Generating… {percent}% · job {job}",
    "status.cancelled": "✖ Cancelled · job {job} · not charged",
    "status.refused": "🚫 The provider refused this prompt: {reason} · job {job} · not charged",
    "status.timeout": "⏱ Timed out · job {job} · not charged",
    "status.failed": "⚠ Failed: {reason} · job {job} · not charged",
    "status.undelivered": "⚠ Job {job} is done, but I could not post the picture here. Send /show {job} to get it.",
    "status.delivered": "✅ Done · job {job}",
    # ---- failure reasons, one per error kind ----
    "reason.refused": "the request was blocked by the provider's safety filter",
    "reason.rate_limited": "the image service is busy, please try again in a minute",
    "reason.rate_limited_for": "the image service is busy for the next {minutes} minutes, please try again then",
    "reason.rate_limited_hours": "the image service will not take more requests for about {hours} hours, please try again then",
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
    "error.quota_usd": "You have used {used} of your {limit} for today. The limit resets tomorrow.",
    "error.quota_images_left": "You asked for {asked} images; {left} of your {limit} are left today.",
    "error.quota_usd_left": "That costs {cost}; {left} of your {limit} for today is left.",
    "error.budget": "The bot has reached its spending limit for today. Please try again tomorrow.",
    "error.job_not_found": "No job {job} of yours was found. See /jobs.",
    "error.job_ended": "Job {job} has already ended: there is nothing to cancel.",
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
    "error.refs_gone": "The reference images of job {job} are no longer kept: send them again with a new /imagine.",
    "error.unknown_command": "I don't know /{command}. See /help.",
    "error.unknown_option": "I don't know the option {option}. Options: --ar --n --model --size --seed",
    "error.option_needs_value": "The option {option} needs a value, e.g. {example}",
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
        "/history — your last jobs · /show <job> — post its images again\n"
        "/link — share your limit with your account on the other platform\n"
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
    # A job's status and a failure's kind, as /jobs and /stats name them.
    "jobstatus.queued": "queued",
    "jobstatus.running": "running",
    "jobstatus.succeeded": "succeeded",
    "jobstatus.failed": "failed",
    "jobstatus.refused": "refused",
    "jobstatus.cancelled": "cancelled",
    "kind.refused": "refused",
    "kind.rate_limited": "rate_limited",
    "kind.transient": "transient",
    "kind.auth": "auth",
    "kind.bad_request": "bad_request",
    "kind.expired": "expired",
    "kind.timeout": "timeout",
    "kind.cancelled": "cancelled",
    "kind.internal": "internal",
    "cancel.done": "✖ Job {job} cancelled, not charged.",
    "models.header": "Models (price per image · aspect ratios):",
    "models.line": "{name} · {price} · {ratios}",
    "settings.summary": "Default model: {model} · language: {lang}",
    "caption": "{prompt}\n{model} · seed {seed} · job {job}",
    "delivered.saved": "✅ Job {job} done. Saved:{paths}",
    "batch.summary": "{images} image(s), {failures} failure(s), cost {cost}, {seconds} s",
    "batch.interrupted": "Interrupted: {cancelled} unfinished job(s) cancelled, not charged.",
    # ---- Telegram ----
    "caption.random": "{prompt}\n{model} · job {job}",
    "result.album": "🖼 {n} images · {model} · job {job}",
    "button.reroll": "🔄 Reroll",
    "button.original": "📎 Original file",
    "button.cancel": "✖ Cancel",
    "button.rerolled": "🔄 Rerolling as job {job}",
    "original.already_sent": "The original file was already sent above.",
    "original.failed": "I could not send the original file of job {job}. Please try again later.",
    "notice.repeated": "{text} (×{count})",
    "hint.photo_needs_caption": (
        "Add a caption to the photo saying what to make of it, e.g. “turn it into a watercolor”."
    ),
    "hint.unsupported": "I read text and photos. Send a prompt, e.g. /imagine a lighthouse at dusk",
    "hint.forwarded": "To use this photo, reply to it with /imagine and what to make of it.",
    "discord.button_gone": "This button no longer works here. Use /imagine or /jobs.",
    "error.reference_too_big": "That image is too large to use as a reference (limit {max_mb} MB).",
    "error.reference_download": "I could not fetch that image from Telegram. Please send it again.",
    "menu.imagine": "Make an image: /imagine a fox in the snow --ar 16:9",
    "menu.usage": "What you have used today",
    "menu.jobs": "Your recent jobs",
    "menu.cancel": "Cancel your latest (or a given) job",
    "menu.models": "The models you can use",
    "menu.settings": "Your defaults",
    "menu.help": "How to use the bot",
    # ---- Discord ----
    "discord.cmd.imagine": "Make an image from a prompt",
    "discord.opt.prompt": "What to draw",
    "discord.opt.aspect_ratio": "Aspect ratio, e.g. 16:9",
    "discord.opt.model": "Model (see /models)",
    "discord.opt.count": "How many images",
    "discord.opt.size": "Size, e.g. 1K or 2K, as the model allows",
    "discord.opt.seed": "Seed, for repeatable results",
    "discord.opt.image": "A reference image (PNG, JPEG or WebP)",
    "discord.opt.job": "Job id (default: your latest)",
    "discord.cmd.stats": "Admins: jobs, images, spend and failures, today and over 7 days",
    "discord.cmd.grant": "Admins: give a user extra images for today",
    "discord.cmd.ban": "Admins: stop a user from using the bot",
    "discord.cmd.unban": "Admins: let a banned user back in",
    "discord.cmd.policy": "Admins: show or change this server's policy",
    "discord.cmd.export": "Admins: usage by day, user and model, as a CSV file",
    "discord.cmd.link": "Share your limit with your account on the other platform",
    "discord.cmd.history": "Your last jobs",
    "discord.cmd.show": "Post a job's images again",
    "discord.opt.user": "The user",
    "discord.opt.images": "Extra images for today",
    "discord.opt.models": "Allowed models, comma-separated (all: every model)",
    "discord.opt.max_images": "Most images per request (0: as the model allows)",
    "discord.opt.daily_images": "Images per day here, all users together (0: no own limit)",
    "discord.opt.blocklist": "Check prompts against the blocklist",
    "discord.opt.code": "The code /link gave you on the other platform (none: get a code)",
    "discord.opt.show_job": "Job id (see /history)",
    "discord.export_too_big": "The usage file ({size}) is too large for Discord. Run drawbridge usage --csv on the server.",
    "discord.scaled": "(Shrunk to fit Discord's {limit} upload limit.)",
    "discord.no_permission": (
        "I can't post in <#{channel}>: I'm missing permissions there (View Channel, Send "
        "Messages, Attach Files). Please ask a server admin."
    ),
    "discord.moved_to_dm": "I couldn't post in <#{channel}> (missing permissions), so here it is.",
    "discord.channel_gone": "The channel <#{channel}> is gone or closed, so I'm telling you here.",
    "discord.moved_from_gone": "The channel <#{channel}> is gone or closed, so here it is.",
    "error.blocked": "🚫 That prompt is not allowed here. Nothing was sent and you were not charged.",
    "error.link_code": "That link code is wrong or has expired. Send /link on the other platform for a new one.",
    "error.link_tries": "Too many wrong link codes. Try again in {minutes} minutes.",
    "error.policy_syntax": "Use: /policy {keys}",
    "error.quota_chat": "This chat has used {used} of its {limit} images today. The limit resets tomorrow.",
    "error.quota_chat_left": "You asked for {asked} images; this chat has {left} of its {limit} left today.",
    "error.model_not_allowed": "{model} is not allowed in this chat. Allowed here: {allowed}.",
    "error.policy_max_images": "This chat allows at most {max} images per request.",
    "error.show_needs_job": "Which job? Use /show <job id> (see /history).",
    "error.no_images": "Job {job} has no stored images to show.",
    "error.admin_only": "Only the bot's admins can do that.",
    "error.grant_syntax": "Use: /grant <user> <images>, e.g. /grant telegram:123 10",
    "error.ban_syntax": "Use: /{command} <user>, e.g. /{command} telegram:123",
    "error.member_by_number": "{platform} knows users by number, not by name: e.g. {platform}:123456789 (the numbers are in /export).",
    "error.ban_admin": "{user} is an admin, and admins are never banned: take them out of ADMIN_IDS first.",
    "link.code": "Your link code: {code}. Within {minutes} minutes, send /link {code} to this bot on the other platform; both accounts will then share one daily limit and history.",
    "link.done": "✅ Linked: your accounts now share one daily limit ({account}).",
    "link.private_only": "Send /link to me in a private chat: the link code is for you alone.",
    "show.done": "Here are the {n} image(s) of job {job}.",
    "export.done": "Usage by day, user and model (CSV).",
    "grant.done": "✅ {user} gets {images} extra image(s) today.",
    "ban.done": "⛔ {user} is banned.",
    "unban.done": "✅ {user} is no longer banned.",
    "policy.show": "Policy for {scope}: {policy}",
    "stats.today": "Today",
    "stats.week": "7 days",
    "stats.queue": "Queue: {queued} waiting · {running} running",
    "stats.period": "{label}: {jobs} jobs · {images} images · {spend}",
    "stats.latency": "latency p50 {p50} s · p95 {p95} s",
    "stats.model": "{model}: {images} images · {spend}",
    "stats.failures": "failures: {failures}",
    "alert.budget": "💸 drawbridge has spent {spent} of today's {budget} budget ({percent} %).",
    "alert.budget_full": (
        "💸 drawbridge is turning requests away: today's {budget} budget is spent or held by "
        "jobs in progress ({spent} spent so far)."
    ),
    "alert.auth": "🔑 The {provider} API rejected drawbridge's key. Jobs on it fail (users are not charged) until the key is fixed.",
    "alert.model_gone": "🧩 {provider} does not serve a model drawbridge asked it for ({error}). Its jobs fail over where PROVIDER_FALLBACKS gives another provider, else fail (users are not charged): update MODELS_FILE.",
    "alert.breaker": "⚡ {provider} keeps failing: drawbridge stopped calling it for a while (fallbacks serve where configured).",
    "alert.paid_exhausted": "⭐ Today's {stars} Stars for Telegram paid broadcasts are spent: until tomorrow drawbridge sends within the free ~30 messages a second (slower at peaks).",
    "alert.paid_refused": "⭐ Telegram refused a paid broadcast (not enabled for the bot, or no Stars left): drawbridge sends within the free ~30 messages a second until it restarts.",
    "status.cached": "♻️ Made before: here it is again, free · job {job}",
    "error.storage": "The bot cannot save new requests right now. Nothing was charged; please try again later.",
    "console.welcome": (
        "drawbridge console · model {model} · type /help, or /quit to leave.\n"
        "Try: /imagine a lighthouse --n 2 --ar 16:9"
    ),
    "console.left_pending": "Still in progress: job {jobs}. What does not finish now finishes the next time drawbridge starts (see /jobs); it is charged only if it succeeds.",
}

ZH: dict[str, str] = {
    "status.queued": "🕒 排队第 {position} 位 · {model} ×{n} · 任务 {job}",
    "status.queued_priced": "🕒 排队第 {position} 位 · {model} ×{n} · {price} · 任务 {job}",
    "status.started": "🎨 正在用 {model} 生成… · 任务 {job}",
    "status.progress": "🎨 生成中… {percent}% · 任务 {job}",
    "status.cancelled": "✖ 已取消 · 任务 {job} · 未扣费",
    "status.refused": "🚫 服务商拒绝了这个提示词：{reason} · 任务 {job} · 未扣费",
    "status.timeout": "⏱ 超时 · 任务 {job} · 未扣费",
    "status.failed": "⚠ 失败：{reason} · 任务 {job} · 未扣费",
    "status.undelivered": "⚠ 任务 {job} 已完成，但无法在这里发送图片。发送 /show {job} 获取。",
    "status.delivered": "✅ 完成 · 任务 {job}",
    "reason.refused": "请求被服务商的安全过滤拦截",
    "reason.rate_limited": "图像服务繁忙，请一分钟后再试",
    "reason.rate_limited_for": "图像服务在接下来 {minutes} 分钟内繁忙，请届时再试",
    "reason.rate_limited_hours": "图像服务在大约 {hours} 小时内不再接受请求，请届时再试",
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
    "error.quota_usd": "你今天已花费 {used}/{limit}，明天重置。",
    "error.quota_images_left": "你请求了 {asked} 张图，今天还剩 {left}/{limit} 张。",
    "error.quota_usd_left": "这次需要 {cost}，今天的 {limit} 还剩 {left}。",
    "error.budget": "机器人今天的预算已用完，请明天再试。",
    "error.job_not_found": "没有找到你的任务 {job}。见 /jobs。",
    "error.job_ended": "任务 {job} 已经结束，无需取消。",
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
    "error.refs_gone": "任务 {job} 的参考图已不再保存：请在新的 /imagine 中重新发送。",
    "error.unknown_command": "我不认识 /{command}。见 /help。",
    "error.unknown_option": "我不认识选项 {option}。可用选项：--ar --n --model --size --seed",
    "error.option_needs_value": "选项 {option} 需要一个值，例如 {example}",
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
        "/history — 最近的任务 · /show <任务> — 重新发送它的图片\n"
        "/link — 与另一个平台上的账号共享额度\n"
        "/help — 本帮助"
    ),
    "start": "你好！我能把文字变成图片。试试：/imagine 黄昏的灯塔 --ar 16:9",
    "usage.summary": "今天：{images}/{image_limit} 张图 · 已花费 {spend}/{spend_limit} · 进行中 {jobs} 个任务",
    "usage.unlimited": "不限",
    "jobs.header": "你最近的任务：",
    "jobs.empty": "你还没有任务。试试 /imagine。",
    "jobs.line": "{job} · {status} · {model} · {prompt}",
    "jobstatus.queued": "排队中",
    "jobstatus.running": "生成中",
    "jobstatus.succeeded": "已完成",
    "jobstatus.failed": "失败",
    "jobstatus.refused": "被拒绝",
    "jobstatus.cancelled": "已取消",
    "kind.refused": "被拒绝",
    "kind.rate_limited": "限流",
    "kind.transient": "临时故障",
    "kind.auth": "账号或密钥",
    "kind.bad_request": "请求无效",
    "kind.expired": "已过期",
    "kind.timeout": "超时",
    "kind.cancelled": "已取消",
    "kind.internal": "内部错误",
    "cancel.done": "✖ 任务 {job} 已取消，未扣费。",
    "models.header": "模型（每张价格 · 宽高比）：",
    "models.line": "{name} · {price} · {ratios}",
    "settings.summary": "默认模型：{model} · 语言：{lang}",
    "caption": "{prompt}\n{model} · 种子 {seed} · 任务 {job}",
    "delivered.saved": "✅ 任务 {job} 完成。已保存：{paths}",
    "batch.summary": "{images} 张图，{failures} 个失败，花费 {cost}，用时 {seconds} 秒",
    "batch.interrupted": "已中断：{cancelled} 个未完成的任务已取消，未扣费。",
    "caption.random": "{prompt}\n{model} · 任务 {job}",
    "result.album": "🖼 {n} 张图 · {model} · 任务 {job}",
    "button.reroll": "🔄 重新生成",
    "button.original": "📎 原图文件",
    "button.cancel": "✖ 取消",
    "button.rerolled": "🔄 已重新提交为任务 {job}",
    "original.already_sent": "原图文件已在上方发送。",
    "original.failed": "无法发送任务 {job} 的原图文件，请稍后再试。",
    "notice.repeated": "{text}（×{count}）",
    "hint.photo_needs_caption": "请给图片加上说明文字，告诉我要怎么处理，例如“改成水彩画风格”。",
    "hint.unsupported": "我能读取文字和图片。请发送提示词，例如 /imagine 黄昏的灯塔",
    "hint.forwarded": "要使用这张图片，请回复它：/imagine 加上你想要的效果。",
    "discord.button_gone": "这个按钮在这里已失效。请使用 /imagine 或 /jobs。",
    "error.reference_too_big": "这张图片太大，无法作为参考图（上限 {max_mb} MB）。",
    "error.reference_download": "无法从 Telegram 获取这张图片，请重新发送。",
    "menu.imagine": "生成图片：/imagine 雪中的狐狸 --ar 16:9",
    "menu.usage": "今天的用量",
    "menu.jobs": "最近的任务",
    "menu.cancel": "取消最近（或指定）的任务",
    "menu.models": "可用的模型",
    "menu.settings": "你的默认设置",
    "menu.help": "使用说明",
    "discord.cmd.imagine": "根据提示词生成图片",
    "discord.opt.prompt": "要画什么",
    "discord.opt.aspect_ratio": "宽高比，例如 16:9",
    "discord.opt.model": "模型（见 /models）",
    "discord.opt.count": "生成几张",
    "discord.opt.size": "尺寸，例如 1K 或 2K（视模型而定）",
    "discord.opt.seed": "种子，用于复现结果",
    "discord.opt.image": "参考图（PNG、JPEG 或 WebP）",
    "discord.opt.job": "任务编号（默认：最近的任务）",
    "discord.cmd.stats": "管理员：今天和 7 天内的任务、图片、花费和失败",
    "discord.cmd.grant": "管理员：今天给用户额外的图片额度",
    "discord.cmd.ban": "管理员：禁止用户使用机器人",
    "discord.cmd.unban": "管理员：解除对用户的封禁",
    "discord.cmd.policy": "管理员：查看或修改本服务器的策略",
    "discord.cmd.export": "管理员：按日期、用户和模型统计的用量 CSV 文件",
    "discord.cmd.link": "与另一个平台上的账号共享额度",
    "discord.cmd.history": "最近的任务",
    "discord.cmd.show": "重新发送某个任务的图片",
    "discord.opt.user": "用户",
    "discord.opt.images": "今天额外的图片张数",
    "discord.opt.models": "允许的模型，用逗号分隔（all：全部模型）",
    "discord.opt.max_images": "每次最多几张图（0：按模型上限）",
    "discord.opt.daily_images": "此处所有用户每天共用的图片数（0：不单独限制）",
    "discord.opt.blocklist": "用屏蔽词表检查提示词",
    "discord.opt.code": "你在另一个平台用 /link 得到的链接码（不填：获取链接码）",
    "discord.opt.show_job": "任务编号（见 /history）",
    "discord.export_too_big": "用量文件（{size}）太大，无法通过 Discord 发送。请在服务器上运行 drawbridge usage --csv。",
    "discord.scaled": "（已缩小以符合 Discord 的 {limit} 上传限制。）",
    "discord.no_permission": "我无法在 <#{channel}> 发消息：缺少权限（查看频道、发送消息、附加文件）。请联系服务器管理员。",
    "discord.moved_to_dm": "我无法在 <#{channel}> 发消息（缺少权限），所以发到这里。",
    "discord.channel_gone": "频道 <#{channel}> 已不存在或已关闭，所以在这里告诉你。",
    "discord.moved_from_gone": "频道 <#{channel}> 已不存在或已关闭，所以发到这里。",
    "error.blocked": "🚫 此处不允许这个提示词。未发送，也未扣费。",
    "error.link_code": "链接码错误或已过期。请在另一个平台发送 /link 获取新的链接码。",
    "error.link_tries": "错误的链接码太多。请 {minutes} 分钟后再试。",
    "error.policy_syntax": "用法：/policy {keys}",
    "error.quota_chat": "本群今天已用 {used}/{limit} 张图，明天重置。",
    "error.quota_chat_left": "你请求了 {asked} 张图，本群今天还剩 {left}/{limit} 张。",
    "error.model_not_allowed": "本群不允许使用 {model}。可用：{allowed}。",
    "error.policy_max_images": "本群每次最多生成 {max} 张图。",
    "error.show_needs_job": "哪个任务？用 /show <任务编号>（见 /history）。",
    "error.no_images": "任务 {job} 没有可显示的图片。",
    "error.admin_only": "只有机器人管理员可以这样做。",
    "error.grant_syntax": "用法：/grant <用户> <张数>，例如 /grant telegram:123 10",
    "error.ban_syntax": "用法：/{command} <用户>，例如 /{command} telegram:123",
    "error.member_by_number": "{platform} 用数字标识用户，而不是名字：例如 {platform}:123456789（数字见 /export）。",
    "error.ban_admin": "{user} 是管理员，管理员不会被封禁：请先把他从 ADMIN_IDS 中移除。",
    "link.code": "你的链接码：{code}。请在 {minutes} 分钟内到另一个平台向本机器人发送 /link {code}，两个账号将共享每日额度和历史。",
    "link.done": "✅ 已链接：你的账号现在共享同一个每日额度（{account}）。",
    "link.private_only": "请在私聊中向我发送 /link：链接码只属于你一个人。",
    "show.done": "这是任务 {job} 的 {n} 张图片。",
    "export.done": "按日期、用户和模型统计的用量（CSV）。",
    "grant.done": "✅ {user} 今天额外获得 {images} 张图。",
    "ban.done": "⛔ 已封禁 {user}。",
    "unban.done": "✅ 已解除对 {user} 的封禁。",
    "policy.show": "{scope} 的策略：{policy}",
    "stats.today": "今天",
    "stats.week": "7 天",
    "stats.queue": "队列：{queued} 个等待 · {running} 个运行中",
    "stats.period": "{label}：{jobs} 个任务 · {images} 张图 · {spend}",
    "stats.latency": "耗时 p50 {p50} 秒 · p95 {p95} 秒",
    "stats.model": "{model}：{images} 张图 · {spend}",
    "stats.failures": "失败：{failures}",
    "alert.budget": "💸 drawbridge 今天已花费 {spent}，预算 {budget}（{percent}%）。",
    "alert.budget_full": "💸 drawbridge 正在拒绝新请求：今天的预算 {budget} 已用完或被进行中的任务占用（已花费 {spent}）。",
    "alert.auth": "🔑 {provider} 的 API 拒绝了 drawbridge 的密钥。修复前该服务的任务都会失败（不向用户扣费）。",
    "alert.model_gone": "🧩 {provider} 不再提供 drawbridge 请求的某个模型（{error}）。配置了 PROVIDER_FALLBACKS 的任务会转到其他服务，否则失败（不向用户扣费）：请更新 MODELS_FILE。",
    "alert.breaker": "⚡ {provider} 持续失败：drawbridge 暂停调用它一段时间（已配置的备用服务会接手）。",
    "alert.paid_exhausted": "⭐ 今天用于 Telegram 付费广播的 {stars} Stars 已用完：明天之前 drawbridge 只按免费的约每秒 30 条发送（高峰时会慢一些）。",
    "alert.paid_refused": "⭐ Telegram 拒绝了付费广播（机器人未开通或 Stars 不足）：drawbridge 在重启前只按免费的约每秒 30 条发送。",
    "status.cached": "♻️ 之前生成过：再次发送，免费 · 任务 {job}",
    "error.storage": "机器人暂时无法保存新的请求。未扣费，请稍后再试。",
    "console.welcome": (
        "drawbridge 控制台 · 模型 {model} · 输入 /help，或 /quit 退出。\n"
        "试试：/imagine 灯塔 --n 2 --ar 16:9"
    ),
    "console.left_pending": "仍在进行中：任务 {jobs}。现在没完成的，会在下次启动 drawbridge 时完成（见 /jobs）；只有成功才扣费。",
}

CATALOGS: Mapping[str, Mapping[str, str]] = {"en": EN, "zh": ZH}


class _Params(dict[str, Any]):
    def __missing__(self, key: str) -> str:
        return "?"


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
        return template.format_map(_Params(params))
    except (ValueError, IndexError, AttributeError, KeyError):
        return template


def queued_text(lang: str, job_id: str, position: int, model: str, n: int, usd: float = 0.0) -> str:
    """A job's "queued" status line, the same on every platform, with what it will cost
    (charged only if it succeeds) when the model has a price."""
    if usd > 0:
        return t(
            lang, "status.queued_priced", job=job_id, position=position, model=model, n=n,
            price=money(usd),
        )  # fmt: skip
    return t(lang, "status.queued", job=job_id, position=position, model=model, n=n)


def money(usd: float) -> str:
    """Dollars as the operator reads them: cents, or the fraction of a cent a price has
    ($0.055, as the catalog's $0.011 add up), never a float's noise ($0.05499999999999999)."""
    text = f"{Decimal(repr(round(usd, 6))):.4f}".rstrip("0")
    whole, _, cents = text.partition(".")
    return f"${whole}.{cents.ljust(2, '0')}"


ECHO_MAX = 64  # characters of a user's value an error repeats back


def plain(text: str) -> str:
    """Text shown as it is: where the platform reads no markup in an answer."""
    return text


# Direction controls (embeddings, overrides, isolates, marks): one typed into a value the bot
# repeats would reverse the bot's own words after it (`--model \u202e…`).
_BIDI = str.maketrans(
    "", "", "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
)


def _unbidi(text: str) -> str:
    return text.translate(_BIDI)


def render_error(lang: str, exc: UserError, escape: Callable[[str], str] = plain) -> str:
    """The error in the user's language; a value they typed is echoed cut short, on one line,
    and `escape`d for the platform's markup (the catalog's own words are left as written)."""
    params = {
        k: escape(v if isinstance(v, Listed) else _unbidi(shorten(v, ECHO_MAX)))
        if isinstance(v, str)
        else v
        for k, v in exc.params.items()
    }
    return t(lang, exc.key, **params)
