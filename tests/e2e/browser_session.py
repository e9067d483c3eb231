"""Drive the demo page in headless Chromium against a server in this process; print a JSON report.

Run inside a network namespace that has only ``lo`` (tests/e2e/test_browser.py does
``unshare -n``), so neither the browser nor the server can reach anything but loopback:

    python tests/e2e/browser_session.py --mode v2v --screenshot shot.png
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

from aiohttp import web
from playwright.async_api import async_playwright

from bench.browser import CHROMIUM_ARGS, bring_loopback_up
from pipeline.config import CONFIG_DIR, load_system_config, replace
from streamer.app import ServerOptions, create_app
from streamer.rtc_internals import use_ice_addresses


async def decoded_frames(page: Any) -> int:
    return await page.evaluate(
        """async () => {
            const stats = await window.demo.pc.getStats();
            let n = 0;
            stats.forEach(r => { if (r.type === 'inbound-rtp' && r.kind === 'video') n = r.framesDecoded || 0; });
            return n;
        }"""
    )


async def main(args: argparse.Namespace) -> dict[str, Any]:
    bring_loopback_up()
    use_ice_addresses(["127.0.0.1"])
    config = replace(load_system_config(CONFIG_DIR / args.config), height=args.size, width=args.size)
    runner = web.AppRunner(create_app(config, ServerOptions()))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    report: dict[str, Any] = {"mode": args.mode}
    try:
        async with async_playwright() as p:
            browser = await p.chromium.launch(executable_path=args.chromium, headless=True, args=CHROMIUM_ARGS)
            page = await browser.new_page(viewport={"width": 1100, "height": 760})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            await page.goto(f"http://127.0.0.1:{port}/")
            await page.select_option("#mode", args.mode)
            # the page asks /api/health for the words the model knows
            await page.wait_for_function("document.body.dataset.health === 'read'", timeout=10_000)
            report["words"] = await page.evaluate(
                "document.getElementById('words').hidden ? null : document.getElementById('words').textContent"
            )
            await page.fill("#prompt", args.prompt)
            await page.click("#start")
            await page.wait_for_function("document.body.dataset.state === 'connected'", timeout=30_000)
            await page.wait_for_function("document.getElementById('video').currentTime > 1.5", timeout=60_000)
            report["frames_decoded"] = await decoded_frames(page)
            report["current_time"] = await page.evaluate("document.getElementById('video').currentTime")
            await page.fill("#prompt", args.prompt2)
            await page.press("#prompt", "Enter")
            ack_has_prompt = "document.getElementById('ack').textContent.includes('prompt')"
            await page.wait_for_function(ack_has_prompt, timeout=10_000)
            await page.click("#cut")
            await page.wait_for_function("document.getElementById('epoch').textContent.trim() === '1'", timeout=10_000)
            before = report["current_time"]
            await page.wait_for_function(f"document.getElementById('video').currentTime > {before} + 1", timeout=30_000)
            report["frames_decoded_after_cut"] = await decoded_frames(page)
            await page.wait_for_timeout(1500)  # let /api/metrics fill the stats panel for the screenshot
            if args.screenshot:
                await page.screenshot(path=args.screenshot)
            report["state"] = await page.evaluate("document.body.dataset.state")
            report["page_errors"] = errors
            await browser.close()
    finally:
        await runner.cleanup()
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["t2v", "v2v"], default="t2v")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--config", default="tiny.yaml", help="a system config in configs/")
    parser.add_argument("--prompt", default="a lighthouse on a cliff at dusk")
    parser.add_argument("--prompt2", default="a storm at sea", help="sent live before the cut")
    parser.add_argument("--screenshot", default=None)
    print(json.dumps(asyncio.run(main(parser.parse_args()))))
