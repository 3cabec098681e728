#!/usr/bin/env python3
"""Interoperability test: aiortc clients in server-routed Confab rooms.

aiortc (with aioice, PyAV and libsrtp underneath) is a WebRTC stack written
independently of Chromium and of webrtc-rs. This script starts the server
binary, lets aiortc clients join rooms that the server routes from their
first member on (``--never-p2p-room 'interop-*'``), answers every server-leg
offer as docs/protocol.md "The server leg" describes, and checks that every
client decodes every other member's video, mapped to the right participant
by the msid stream id. Each client sends video of its own size and
brightness, so a receiver can tell from the decoded frames alone whose
video a track carries.

Run it (as root) in a network namespace that has only loopback, as
scripts/test.sh does:

    unshare -n sh -c 'ip link set lo up && .venv-interop/bin/python tests/interop/aiortc_sfu.py'

The server binary is $CONFAB_BIN, else target/debug/confab. The last line
is ``interop: N passed, M failed``; the exit code is 0 only when no check
failed. Figures go to test-output/interop/aiortc_sfu.json.

What the client does differently from a browser, and why (aiortc 1.16):

- It gathers a 127.0.0.1 host candidate (aioice leaves loopback out).
- It uses bundlePolicy max-bundle and adds its audio track before its video
  track: with aiortc's default (balanced) policy, a transceiver that
  applying the offer creates for a second video section keeps a transport
  that the BUNDLE step then stops, so that member's video never arrives.
- It hands the BUNDLE-tag section's candidates to the bundle transport
  itself: aiortc keeps the candidates of the last section sharing a
  transport (aiortc issue #1437), and the server, as RFC 8843 has it, lists
  them only in the tagged section.
- Its ICE consent checks (RFC 7675: every 5 s, randomized to 4-6 s) are
  pinned: to 4 s in the ordinary checks, to 6 s in ``consent_pacing``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import inspect
import json
import os
import re
import secrets
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import aioice
import aioice.ice
import aiortc
import av
import websockets
from aiortc import (
    AudioStreamTrack,
    RTCBundlePolicy,
    RTCConfiguration,
    RTCPeerConnection,
    RTCSessionDescription,
    VideoStreamTrack,
)
from aiortc.mediastreams import MediaStreamError
from aiortc.sdp import candidate_from_sdp

REPO_ROOT = Path(__file__).resolve().parents[2]
OUTPUT_DIR = REPO_ROOT / "test-output" / "interop"

# How long each decoded-video measurement runs, and the least number of
# frames it must see from one sender (the senders make 30 frames a second).
MEASURE_SECS = 3.0
MIN_FRAMES = 30
# How far the decoded picture's typical luma may stray from the sender's.
LUMA_TOLERANCE = 24
# The SRTP protection profiles a Confab server leg can negotiate.
SERVER_SRTP_PROFILES = {"SRTP_AEAD_AES_128_GCM", "SRTP_AES128_CM_SHA1_80"}
# aiortc's bundle policy (--balanced shows why not its default).
BUNDLE_POLICY = RTCBundlePolicy.MAX_BUNDLE
# Hand the BUNDLE-tag section's candidates to aiortc (--no-candidate-fix
# shows aiortc issue #1437).
CANDIDATE_FIX = True


# --- loopback host candidates ------------------------------------------------
#
# aioice 0.13's get_host_addresses() skips 127.0.0.1 (and ::1) on purpose,
# and Connection() has no option to keep it: use_ipv4/use_ipv6 only choose
# the family. In a loopback-only namespace that leaves no host candidate at
# all. gather_candidates() calls the module-level function, so replacing it
# is the one way in. Loopback only: the test's media stays on 127.0.0.1
# even when the script runs outside a namespace.


def loopback_host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
    return ["127.0.0.1"] if use_ipv4 else []


aioice.ice.get_host_addresses = loopback_host_addresses


# --- consent-check pacing ----------------------------------------------------
#
# aioice sends an RFC 7675 consent check every CONSENT_INTERVAL × (0.8 + 0.4 ×
# random.random()) seconds, 4-6 s, and that is the module's only use of
# `random`. Standing in for the module pins the interval, so that a check's
# outcome does not depend on the draw.


class ConsentPacing:
    """Replaces `random` in aioice.ice: random() returns a fixed fraction."""

    fraction = 0.0  # 0.0: every 4 s; 1.0: every 6 s

    def random(self) -> float:
        return self.fraction

    @staticmethod
    def interval(fraction: float) -> float:
        return aioice.ice.CONSENT_INTERVAL * (0.8 + 0.4 * fraction)


if "random.random()" not in inspect.getsource(aioice.ice.Connection.query_consent):
    raise SystemExit("aioice's consent timer changed: revisit ConsentPacing")
CONSENT = ConsentPacing()
aioice.ice.random = CONSENT  # type: ignore[assignment]


# --- the server --------------------------------------------------------------


class Server:
    """`confab serve --listen 127.0.0.1:0 --media-port 0 ...` on this machine."""

    def __init__(self, extra_args: list[str]):
        self.extra_args = extra_args
        self.proc: asyncio.subprocess.Process | None = None
        self.url = ""
        self.media_addr = ""
        self.lines: collections.deque[str] = collections.deque(maxlen=400)
        self._drains: list[asyncio.Task] = []

    async def start(self, timeout: float = 15.0) -> None:
        binary = Path(os.environ.get("CONFAB_BIN", "target/debug/confab"))
        if not binary.is_absolute():
            binary = REPO_ROOT / binary
        if not binary.exists():
            raise RuntimeError(
                f"server binary not found at {binary} "
                "(build it with `cargo build --bin confab` or set CONFAB_BIN)"
            )
        args = ["serve", "--listen", "127.0.0.1:0", "--media-port", "0",
                "--never-p2p-room", "interop-*", *self.extra_args]
        # A server with the embedded TURN server binds its fixed port unless
        # told otherwise; older binaries do not know the flag.
        helper = await asyncio.create_subprocess_exec(
            str(binary), "serve", "--help",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
        if b"--turn-port" in (await asyncio.wait_for(helper.communicate(), 10))[0]:
            args += ["--turn-port", "0"]
        self.proc = await asyncio.create_subprocess_exec(
            str(binary), *args, cwd=REPO_ROOT,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        self._drains.append(asyncio.create_task(self._drain(self.proc.stderr, "stderr")))
        try:
            await asyncio.wait_for(self._read_banner(), timeout)
        except BaseException:
            await self.stop()
            raise
        self._drains.append(asyncio.create_task(self._drain(self.proc.stdout, "stdout")))

    async def _read_banner(self) -> None:
        assert self.proc and self.proc.stdout
        while not (self.url and self.media_addr):
            line = await self.proc.stdout.readline()
            if not line:
                raise RuntimeError("server exited before printing its URL and media port:\n"
                                   + self.output())
            text = line.decode(errors="replace").rstrip()
            self.lines.append(f"stdout: {text}")
            if not self.url and (m := re.search(r"http://[^\s/]+", text)):
                self.url = m.group(0)
            if m := re.search(r"Media \(UDP\) on (\S+?):(\d+)", text):
                self.media_addr = f"{m.group(1)}:{m.group(2)}"

    async def _drain(self, stream: asyncio.StreamReader | None, name: str) -> None:
        if stream is None:
            return
        while line := await stream.readline():
            self.lines.append(f"{name}: {line.decode(errors='replace').rstrip()}")

    @property
    def ws_url(self) -> str:
        return self.url.replace("http://", "ws://", 1) + "/ws"

    def output(self) -> str:
        return "\n".join(self.lines)

    async def stop(self) -> None:
        proc = self.proc
        if proc is not None and proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()
        for task in self._drains:
            task.cancel()


# --- media -------------------------------------------------------------------


class PatternTrack(VideoStreamTrack):
    """30 frames/s of a flat picture of one brightness with a moving white bar."""

    def __init__(self, width: int, height: int, luma: int):
        super().__init__()
        self.width, self.height, self.luma = width, height, luma
        self.frames_sent = 0

    async def recv(self) -> av.VideoFrame:
        pts, time_base = await self.next_timestamp()
        frame = av.VideoFrame(self.width, self.height, "yuv420p")
        y_plane, u_plane, v_plane = frame.planes
        stride = y_plane.line_size
        y = bytearray([self.luma]) * (stride * self.height)
        bar = 16
        x0 = (self.frames_sent * 4) % (self.width - bar)
        for row in range(self.height):
            y[row * stride + x0: row * stride + x0 + bar] = b"\xff" * bar
        y_plane.update(bytes(y))
        for plane in (u_plane, v_plane):
            plane.update(b"\x80" * (plane.line_size * plane.height))
        frame.pts, frame.time_base = pts, time_base
        self.frames_sent += 1
        return frame


def typical_luma(frame: av.VideoFrame) -> int:
    """Median luma of the picture's middle row (the moving bar barely moves it)."""
    plane = frame.planes[0]
    row = frame.height // 2
    data = bytes(plane)[row * plane.line_size: row * plane.line_size + frame.width]
    return int(statistics.median(data[::2]))


@dataclass
class Inbound:
    """One remote track on a client's server leg and what it decoded."""

    kind: str
    mid: str
    participant: str  # the msid stream id of the section
    msid_track: str
    track_id: str
    track: object = None
    frames: int = 0
    arrivals: list[float] = field(default_factory=list)
    sizes: collections.Counter = field(default_factory=collections.Counter)
    lumas: list[int] = field(default_factory=list)
    first_frame_at: float | None = None

    def frames_between(self, start: float, end: float) -> int:
        return sum(1 for t in self.arrivals if start <= t < end)

    def longest_gap(self, start: float, end: float) -> float:
        """Longest time without a decoded frame within [start, end]."""
        times = [start, *(t for t in self.arrivals if start <= t < end), end]
        return max(b - a for a, b in zip(times, times[1:]))


# --- SDP ---------------------------------------------------------------------


@dataclass
class Section:
    kind: str
    mid: str
    direction: str
    msid_stream: str | None
    msid_track: str | None


def sdp_blocks(sdp: str) -> list[str]:
    return re.split(r"\r?\n(?=m=)", sdp)[1:]


def sdp_sections(sdp: str) -> list[Section]:
    sections: list[Section] = []
    for block in sdp_blocks(sdp):
        lines = block.splitlines()
        kind = lines[0][2:].split()[0]
        mid, direction, stream, track = "", "sendrecv", None, None
        for line in lines[1:]:
            line = line.strip()
            if line.startswith("a=mid:"):
                mid = line[6:]
            elif line in ("a=sendrecv", "a=sendonly", "a=recvonly", "a=inactive"):
                direction = line[2:]
            elif line.startswith("a=msid:"):
                bits = line[7:].split()
                stream, track = bits[0], (bits[1] if len(bits) > 1 else None)
        sections.append(Section(kind, mid, direction, stream, track))
    return sections


# --- one aiortc participant --------------------------------------------------


class Client:
    def __init__(self, label: str, server: Server, width: int, height: int, luma: int,
                 audio: bool = True):
        self.label = label
        self.server = server
        self.video = PatternTrack(width, height, luma)
        self.audio = AudioStreamTrack() if audio else None
        # iceServers=[]: aiortc would otherwise ask a public STUN server.
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[], bundlePolicy=BUNDLE_POLICY))
        self.ws = None
        self.id = ""
        self.joined: dict = {}
        self.join_sent_at = 0.0
        self.offers: list[str] = []
        self.answers: list[str] = []
        self.sections: dict[str, Section] = {}
        self.inbound: list[Inbound] = []
        self.errors: list[str] = []  # protocol errors and exceptions: any fails a check
        self.messages: list[str] = []
        self.leg_events: list[tuple[float, str, str]] = []  # (time, participant, state)
        self.pc_events: dict[str, float] = {}  # first time of each ICE/connection state
        # Offers after which aiortc's bundle transport had no remote candidate
        # of its own (before this client supplied the BUNDLE-tag section's).
        self.offers_without_candidates = 0
        self._tasks: list[asyncio.Task] = []

        @self.pc.on("iceconnectionstatechange")
        def _ice_state() -> None:
            self.pc_events.setdefault(f"ice_{self.pc.iceConnectionState}", time.monotonic())

        @self.pc.on("connectionstatechange")
        def _pc_state() -> None:
            self.pc_events.setdefault(f"pc_{self.pc.connectionState}", time.monotonic())

        # The local tracks go in before the first offer is applied: aiortc
        # then pairs these transceivers (mid still unset) with the offer's
        # first audio and first video section, the ones the server receives
        # on. Audio first, in the offer's order: with max-bundle the first
        # transceiver owns the one transport, and it must be the one that
        # takes the BUNDLE-tag section (mid 0, audio). Without a microphone a
        # track-less sendonly audio transceiver stands in (aiortc, unlike a
        # browser, pairs addTransceiver() transceivers with offered sections).
        if self.audio is not None:
            self.audio_sender = self.pc.addTrack(self.audio)
        else:
            self.audio_sender = self.pc.addTransceiver("audio", direction="sendonly").sender
        self.video_sender = self.pc.addTrack(self.video)

    def log(self, text: str) -> None:
        self.messages.append(f"{time.monotonic():.3f} {text}")

    async def join(self, room: str) -> None:
        self.ws = await websockets.connect(self.server.ws_url, open_timeout=10, max_size=2**20)
        self.join_sent_at = time.monotonic()
        await self.ws.send(json.dumps({"type": "join", "v": 2, "room": room, "name": self.label}))
        first = json.loads(await asyncio.wait_for(self.ws.recv(), 10))
        if first.get("type") != "joined":
            raise AssertionError(f"{self.label}: expected joined, got {first}")
        self.joined = first
        self.id = first["participant_id"]
        self.log(f"joined as {self.id}, mode {first.get('mode')}")
        self._tasks.append(asyncio.create_task(self._signaling()))

    async def leave(self) -> None:
        if self.ws is not None:
            await self.ws.send(json.dumps({"type": "leave"}))

    async def _signaling(self) -> None:
        try:
            async for raw in self.ws:
                msg = json.loads(raw)
                kind = msg.get("type")
                if kind == "offer" and msg.get("from") == "sfu":
                    await self._answer(msg["sdp"])
                elif kind == "error":
                    self.errors.append(f"server error: {msg}")
                    self.log(f"error {msg}")
                elif kind == "server_leg":
                    self.leg_events.append((time.monotonic(), msg["id"], msg["state"]))
                    self.log(f"server_leg {msg['id']} {msg['state']}")
                else:
                    self.log(f"{kind} {json.dumps(msg)[:200]}")
        except websockets.ConnectionClosed as exc:
            self.log(f"socket closed: {exc}")
        except Exception:  # noqa: BLE001 - recorded and reported by the check
            self.errors.append(f"signaling: {traceback.format_exc()}")

    async def _answer(self, sdp: str) -> None:
        self.offers.append(sdp)
        self.log(f"offer #{len(self.offers)} from sfu")
        try:
            await self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
            await self._bundle_candidates(sdp)
            answer = await self.pc.createAnswer()
            await self.pc.setLocalDescription(answer)
        except Exception:  # noqa: BLE001
            self.errors.append(
                f"applying offer #{len(self.offers)} failed:\n{traceback.format_exc()}\n"
                f"--- offer ---\n{sdp}")
            return
        local = self.pc.localDescription.sdp
        self.answers.append(local)
        await self.ws.send(json.dumps({"type": "answer", "to": "sfu", "sdp": local}))
        for section in sdp_sections(sdp):
            self.sections[section.mid] = section
        self._watch_new_tracks()

    async def _bundle_candidates(self, sdp: str) -> None:
        """Hands the BUNDLE-tag section's candidates to the bundle transport.

        The server, like any JSEP offerer with an established or max-bundle
        group (RFC 8843), lists its candidates and a=end-of-candidates only
        in the tagged m= section. aiortc 1.16 keeps, per transport, the
        candidates of the *last* section mapped to it (aiortc issue #1437),
        so with more than one section on the transport it ends up with none
        and never sends a check. Adding them through the transport's public
        addRemoteCandidate() is what a trickling client would do; duplicates
        and anything after end-of-candidates are ignored by aiortc/aioice.
        """
        group = re.search(r"^a=group:BUNDLE (.+)$", sdp, re.M)
        if not group:
            return
        tag = group.group(1).split()[0]
        blocks = [b for b in sdp_blocks(sdp)
                  if re.search(rf"^a=mid:{re.escape(tag)}\s*$", b, re.M)]
        transceiver = next((t for t in self.pc.getTransceivers() if t.mid == tag), None)
        if not blocks or transceiver is None:
            return
        ice = transceiver.receiver.transport.transport
        if not ice.getRemoteCandidates():
            self.offers_without_candidates += 1
        if not CANDIDATE_FIX:
            return
        for line in blocks[0].splitlines():
            line = line.strip()
            if line.startswith("a=candidate:"):
                candidate = candidate_from_sdp(line[len("a=candidate:"):])
                candidate.sdpMid = tag
                await ice.addRemoteCandidate(candidate)
            elif line == "a=end-of-candidates":
                await ice.addRemoteCandidate(None)

    def _watch_new_tracks(self) -> None:
        watched = {id(i.track) for i in self.inbound}
        for transceiver in self.pc.getTransceivers():
            track = transceiver.receiver.track
            if track is None or id(track) in watched or transceiver.mid not in self.sections:
                continue
            section = self.sections[transceiver.mid]
            if section.direction not in ("sendonly", "sendrecv"):
                continue
            inbound = Inbound(kind=track.kind, mid=transceiver.mid,
                              participant=section.msid_stream or "",
                              msid_track=section.msid_track or "", track_id=track.id,
                              track=track)
            self.inbound.append(inbound)
            self.log(f"track {track.kind} mid {transceiver.mid} from {inbound.participant}")
            self._tasks.append(asyncio.create_task(self._consume(inbound, track)))

    async def _consume(self, inbound: Inbound, track) -> None:
        try:
            while True:
                frame = await track.recv()
                now = time.monotonic()
                inbound.frames += 1
                inbound.arrivals.append(now)
                if inbound.first_frame_at is None:
                    inbound.first_frame_at = now
                if inbound.kind == "video":
                    inbound.sizes[(frame.width, frame.height)] += 1
                    if inbound.frames % 10 == 1:
                        inbound.lumas.append(typical_luma(frame))
        except MediaStreamError:
            pass
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001
            self.errors.append(f"decoding {inbound.kind} mid {inbound.mid}: "
                               f"{traceback.format_exc()}")

    def video_from(self, participant: str) -> list[Inbound]:
        return [i for i in self.inbound if i.kind == "video" and i.participant == participant]

    def audio_from(self, participant: str) -> list[Inbound]:
        return [i for i in self.inbound if i.kind == "audio" and i.participant == participant]

    def own_leg_drops(self) -> list[float]:
        """When the server reported this client's leg other than connected
        after it had been connected (seconds since it first was)."""
        connected = [t for t, who, state in self.leg_events
                     if who == self.id and state == "connected"]
        return [round(t - connected[0], 1) for t, who, state in self.leg_events
                if who == self.id and state in ("disconnected", "failed")
                and connected and t > connected[0]]

    def srtp_profile(self) -> str | None:
        """The profile DTLS negotiated on the (bundled) transport; aiortc keeps
        it only on its OpenSSL connection (and in a debug log line)."""
        for transceiver in self.pc.getTransceivers():
            ssl = getattr(transceiver.receiver.transport, "_ssl", None)
            if ssl is not None and (profile := ssl.get_selected_srtp_profile()):
                return profile.decode()
        return None

    def selected_pair(self) -> str | None:
        for transceiver in self.pc.getTransceivers():
            conn = transceiver.receiver.transport.transport._connection
            pair = getattr(conn, "_nominated", {}).get(1)
            if pair is not None:
                return (f"{pair.local_candidate.host}:{pair.local_candidate.port} -> "
                        f"{pair.remote_candidate.host}:{pair.remote_candidate.port}")
        return None

    def dtls_role(self) -> str | None:
        for transceiver in self.pc.getTransceivers():
            return getattr(transceiver.receiver.transport, "_role", None)
        return None

    def timeline_ms(self) -> dict:
        """Milliseconds from sending join to each step of the server leg."""
        firsts = [i.first_frame_at for i in self.inbound if i.kind == "video" and i.first_frame_at]
        steps = {"ice_checking": self.pc_events.get("ice_checking"),
                 "ice_completed": self.pc_events.get("ice_completed"),
                 "dtls_connected": self.pc_events.get("pc_connected"),
                 "first_frame": min(firsts) if firsts else None}
        return {k: round((v - self.join_sent_at) * 1000) if v else None for k, v in steps.items()}

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.ws is not None:
            try:
                await asyncio.wait_for(self.ws.close(), 3)
            except Exception:  # noqa: BLE001
                pass
        try:
            await asyncio.wait_for(self.pc.close(), 5)
        except Exception:  # noqa: BLE001
            pass

    def diagnostics(self) -> str:
        parts = [f"--- client {self.label} ({self.id}) ---",
                 f"connectionState={self.pc.connectionState} "
                 f"iceConnectionState={self.pc.iceConnectionState} "
                 f"offers without candidates for aiortc={self.offers_without_candidates}",
                 *self.messages[-40:], *self.errors]
        if self.offers:
            parts += ["--- last offer ---", self.offers[-1]]
        if self.answers:
            parts += ["--- last answer ---", self.answers[-1]]
        return "\n".join(parts)


# --- the checks --------------------------------------------------------------

# One size and brightness per sender, so decoded frames tell whose they are.
LOOKS = [(320, 240, 60), (352, 288, 180), (256, 192, 120)]


class CheckFailed(AssertionError):
    pass


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


async def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        await asyncio.sleep(interval)
    raise CheckFailed(f"timed out after {timeout:.0f} s waiting for {what}")


def no_errors(clients: list[Client]) -> None:
    for c in clients:
        expect(not c.errors, f"{c.label}: " + "\n".join(c.errors))


def legs_stayed_connected(clients: list[Client]) -> None:
    for c in clients:
        drops = c.own_leg_drops()
        expect(not drops, f"{c.label}: the server reported its leg disconnected at {drops} s "
                          "after it connected")


async def all_decoding(clients: list[Client], timeout: float = 20) -> None:
    def decoding() -> bool:
        return all(
            any(i.first_frame_at is not None for i in c.video_from(other.id))
            for c in clients for other in clients if other is not c)

    await wait_for(decoding, timeout, "every client to decode every other member's video")


async def measure_video(clients: list[Client]) -> dict:
    """Waits for every client to decode every other member's video, then
    counts MEASURE_SECS of decoded frames per (receiver, sender) and checks
    them against what the sender generates."""
    await all_decoding(clients)
    start = time.monotonic()
    await asyncio.sleep(MEASURE_SECS)
    end = time.monotonic()
    no_errors(clients)
    figures = {}
    for c in clients:
        others = {o.id for o in clients if o is not c}
        video_ids = {i.participant for i in c.inbound if i.kind == "video"}
        live_video = {i.participant for i in c.inbound if i.kind == "video" and i.frames}
        expect(others <= video_ids,
               f"{c.label} has video sections for {sorted(video_ids)}, wants {sorted(others)}")
        expect(live_video == others,
               f"{c.label} decodes video from {sorted(live_video)}, expected {sorted(others)}")
        for other in clients:
            if other is c:
                continue
            [inbound] = [i for i in c.video_from(other.id) if i.frames]
            frames = inbound.frames_between(start, end)
            want = (other.video.width, other.video.height)
            sizes = dict(inbound.sizes)
            luma = int(statistics.median(inbound.lumas)) if inbound.lumas else -1
            expect(frames > MIN_FRAMES,
                   f"{c.label} decoded only {frames} frames from {other.label} "
                   f"in {end - start:.1f} s (want > {MIN_FRAMES})")
            expect(set(sizes) == {want},
                   f"{c.label} got frame sizes {sizes} from {other.label}, "
                   f"which sends {want[0]}x{want[1]}")
            expect(abs(luma - other.video.luma) <= LUMA_TOLERANCE,
                   f"{c.label}'s track for {other.label} ({other.id}) shows luma {luma}, "
                   f"{other.label} sends {other.video.luma}: wrong sender mapped?")
            audio_frames = sum(i.frames_between(start, end) for i in c.audio_from(other.id))
            if other.audio is not None:
                expect(audio_frames > MEASURE_SECS * 25,
                       f"{c.label} decoded {audio_frames} audio frames from {other.label} "
                       f"in {end - start:.1f} s")
            figures[f"{c.label}<-{other.label}"] = {
                "video_frames": frames,
                "fps": round(frames / (end - start), 1),
                "size": f"{want[0]}x{want[1]}",
                "luma": luma,
                "audio_frames": audio_frames,
                "mid": inbound.mid,
                # aiortc takes msid's track id only under a=msid-semantic,
                # which the server's first offer on a leg lacks.
                "track_id_is_msid_track": inbound.track_id == inbound.msid_track,
            }
    return figures


def check_answers(c: Client) -> None:
    """The answer sends on the first audio and video section, receives on the rest."""
    offer = sdp_sections(c.offers[-1])
    answer = sdp_sections(c.answers[-1])
    expect([s.mid for s in offer] == [s.mid for s in answer],
           f"{c.label}: answer mids {[s.mid for s in answer]} != offer {[s.mid for s in offer]}")
    first = {}
    for o, a in zip(offer, answer):
        if o.kind not in first:
            first[o.kind] = o.mid
            expect(o.direction == "recvonly" and a.direction == "sendonly",
                   f"{c.label}: first {o.kind} section {o.mid}: offer {o.direction}, "
                   f"answer {a.direction} (want recvonly/sendonly)")
        elif o.direction == "sendonly":
            expect(a.direction == "recvonly",
                   f"{c.label}: section {o.mid} offered sendonly, answered {a.direction}")
    video_mid = next(t.mid for t in c.pc.getTransceivers() if t.sender is c.video_sender)
    expect(video_mid == first.get("video"),
           f"{c.label}: camera track bound to mid {video_mid}, "
           f"the first video section is {first.get('video')}")


async def two_party(server: Server, report: dict, clients: list[Client]) -> str:
    room = f"interop-{secrets.token_hex(4)}"
    a = Client("A", server, *LOOKS[0])
    b = Client("B", server, *LOOKS[1])
    clients += [a, b]
    await a.join(room)
    expect(a.joined["mode"]["mode"] == "sfu",
           f"room {room} should be server-routed from its first member: {a.joined['mode']}")
    await b.join(room)
    figures = await measure_video(clients)
    legs_stayed_connected(clients)
    for c in clients:
        check_answers(c)
        states = [s for _, who, s in c.leg_events if who == c.id]
        expect(states[-1:] == ["connected"], f"{c.label}: own server_leg states {states}")
    profiles = {c.label: c.srtp_profile() for c in clients}
    for label, profile in profiles.items():
        expect(profile in SERVER_SRTP_PROFILES,
               f"{label}: SRTP profile {profile!r} is not one a server leg offers")
    timelines = {c.label: c.timeline_ms() for c in clients}
    report.update({
        "room": room,
        "streams": figures,
        "timeline_ms_from_join": timelines,
        "srtp_profile": profiles,
        "aiortc_dtls_role": {c.label: c.dtls_role() for c in clients},
        "selected_pair": {c.label: c.selected_pair() for c in clients},
        "offers": {c.label: len(c.offers) for c in clients},
        "offers_without_candidates_for_aiortc": {c.label: c.offers_without_candidates
                                                 for c in clients},
    })
    frames = ", ".join(f"{k} {v['video_frames']} frames {v['size']}" for k, v in figures.items())
    tb = timelines["B"]
    return (f"{frames} in {MEASURE_SECS:.0f} s; B (second to join): join->ICE completed "
            f"{tb['ice_completed']} ms, ->DTLS {tb['dtls_connected']} ms, ->first frame "
            f"{tb['first_frame']} ms; SRTP {profiles['B']}")


async def three_way(server: Server, report: dict, clients: list[Client]) -> str:
    room = f"interop-{secrets.token_hex(4)}"
    clients += [Client(label, server, *look) for label, look in zip("ABC", LOOKS)]
    a, b, c = clients
    for client in clients:
        await client.join(room)
    figures = await measure_video(clients)
    for client in clients:
        check_answers(client)
        senders = [i.participant for i in client.inbound if i.kind == "video"]
        expect(len(senders) == 2,
               f"{client.label} has {len(senders)} remote video tracks: {senders}")
    report.update({
        "room": room,
        "ids": {x.label: x.id for x in clients},
        "streams": figures,
        "timeline_ms_from_join": {x.label: x.timeline_ms() for x in clients},
        "offers": {x.label: len(x.offers) for x in clients},
        "offers_without_candidates_for_aiortc": {x.label: x.offers_without_candidates
                                                 for x in clients},
        "srtp_profile": {x.label: x.srtp_profile() for x in clients},
    })

    # C leaves and hangs up: A and B get an offer with C's sections
    # inactive, and keep decoding each other on the same tracks.
    offers_before = {x.label: len(x.offers) for x in (a, b)}
    await c.leave()
    await c.close()
    await wait_for(lambda: all(len(x.offers) > offers_before[x.label]
                               and len(x.answers) == len(x.offers) for x in (a, b)),
                   10, "A and B to answer the offer after C left")
    for x in (a, b):
        c_mids = {i.mid for i in x.inbound if i.participant == c.id}
        gone = [s for s in sdp_sections(x.offers[-1]) if s.mid in c_mids]
        expect(len(gone) == 2 and all(s.direction == "inactive" for s in gone),
               f"{x.label}: C's sections {sorted(c_mids)} after it left: "
               f"{[(s.mid, s.direction) for s in gone]}")
    await asyncio.sleep(0.5)
    start = time.monotonic()
    await asyncio.sleep(2.0)
    end = time.monotonic()
    no_errors([a, b])
    legs_stayed_connected([a, b])
    after = {}
    for x, other in ((a, b), (b, a)):
        [inbound] = [i for i in x.video_from(other.id) if i.frames]
        n = inbound.frames_between(start, end)
        expect(n > 40, f"{x.label} decoded {n} frames from {other.label} in 2 s after C left")
        stale = sum(i.frames_between(start, end) for i in x.video_from(c.id))
        expect(stale == 0, f"{x.label} still decodes {stale} frames from C after it left")
        after[f"{x.label}<-{other.label}"] = n
    report["after_c_left_2s"] = after
    summary = ", ".join(f"{k} {v['video_frames']}" for k, v in figures.items())
    return (f"frames in {MEASURE_SECS:.0f} s: {summary}; in 2 s after C left: "
            + ", ".join(f"{k} {v}" for k, v in after.items()))


async def gcm_only(server: Server, report: dict, clients: list[Client]) -> str:
    """A GCM-only server leg, with two clients that send no audio."""
    room = f"interop-{secrets.token_hex(4)}"
    clients += [Client("A", server, *LOOKS[0], audio=False),
                Client("B", server, *LOOKS[1], audio=False)]
    for client in clients:
        await client.join(room)
    figures = await measure_video(clients)
    legs_stayed_connected(clients)
    profiles = {x.label: x.srtp_profile() for x in clients}
    for label, profile in profiles.items():
        expect(profile == "SRTP_AEAD_AES_128_GCM",
               f"{label}: --srtp-gcm-only server leg negotiated {profile!r}")
    report.update({"streams": figures, "srtp_profile": profiles})
    return (", ".join(f"{k} {v['video_frames']} frames" for k, v in figures.items())
            + f"; SRTP {profiles['A']}")


CONSENT_WATCH_SECS = 14.0


async def consent_pacing(server: Server, report: dict, clients: list[Client]) -> str:
    """Consent checks every 6 s, the longest interval RFC 7675 allows.

    The leg's ICE agent (`rtc` 0.21.1) counts only inbound STUN as a sign of
    life, so with its default 5 s disconnected timeout a leg whose client
    checks every 6 s was declared disconnected while media flowed, the SFU
    stopped forwarding to it, and the skipped packets left a sequence gap
    aiortc's jitter buffer waited on: 9 s video freezes. The server now
    waits 15 s (30 s to failed, consent's lifetime), keeps forwarding to a
    disconnected leg, and restarts a paused downtrack without a sequence
    hole. This check guards all three.
    """
    CONSENT.fraction = 1.0
    try:
        room = f"interop-{secrets.token_hex(4)}"
        clients += [Client("A", server, *LOOKS[0]), Client("B", server, *LOOKS[1])]
        a, b = clients
        for client in clients:
            await client.join(room)
        await all_decoding(clients)
        start = time.monotonic()
        await asyncio.sleep(CONSENT_WATCH_SECS)
        end = time.monotonic()
    finally:
        CONSENT.fraction = 0.0
    no_errors(clients)
    drops = {x.label: x.own_leg_drops() for x in clients}
    gaps, frames = {}, {}
    for x, other in ((a, b), (b, a)):
        [inbound] = [i for i in x.video_from(other.id) if i.frames]
        gaps[f"{x.label}<-{other.label}"] = round(inbound.longest_gap(start, end), 2)
        frames[f"{x.label}<-{other.label}"] = inbound.frames_between(start, end)
    report.update({"consent_interval_s": ConsentPacing.interval(1.0),
                   "watch_s": CONSENT_WATCH_SECS, "leg_disconnected_at_s": drops,
                   "longest_video_gap_s": gaps, "video_frames": frames})
    problems = [f"{label}'s leg reported disconnected at {t} s after connecting"
                for label, t in drops.items() if t]
    problems += [f"{k} video froze for {g} s" for k, g in gaps.items() if g > 1.0]
    if problems:
        raise CheckFailed("; ".join(problems) + " (see consent_pacing's docstring)")
    return (f"no disconnected leg and longest video gap {max(gaps.values())} s in "
            f"{CONSENT_WATCH_SECS:.0f} s with a consent check every "
            f"{ConsentPacing.interval(1.0):.0f} s")


CHECKS = [
    # (name, server flags, check, timeout in seconds)
    ("two aiortc clients decode each other via the server", [], two_party, 45),
    ("three-way call: two remote videos each, mapped by msid; a member leaves",
     [], three_way, 60),
    ("--srtp-gcm-only server leg, clients without audio", ["--srtp-gcm-only"], gcm_only, 45),
    ("server keeps forwarding with consent checks 6 s apart (RFC 7675's longest)",
     [], consent_pacing, 60),
]


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", default="", help="run only checks whose name contains this")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="aiortc/aioice debug logs on stderr")
    parser.add_argument("--balanced", action="store_true",
                        help="use aiortc's default bundle policy (fails: see the docstring)")
    parser.add_argument("--no-candidate-fix", action="store_true",
                        help="leave the offer's candidates to aiortc (aiortc issue #1437)")
    args = parser.parse_args()
    global BUNDLE_POLICY, CANDIDATE_FIX
    if args.balanced:
        BUNDLE_POLICY = RTCBundlePolicy.BALANCED
    CANDIDATE_FIX = not args.no_candidate_fix
    if args.verbose:
        import logging
        logging.basicConfig(level=logging.DEBUG,
                            format="%(relativeCreated)8.0f %(name)s %(message)s")
    report: dict = {"aiortc": aiortc.__version__, "aioice": aioice.__version__,
                    "av": av.__version__, "checks": {}}
    passed = failed = 0
    servers: dict[tuple, Server] = {}
    try:
        for name, flags, check, timeout in CHECKS:
            if args.k not in name:
                continue
            key = tuple(flags)
            check_report: dict = {}
            clients: list[Client] = []
            started = time.monotonic()
            try:
                if key not in servers:
                    # One server at a time.
                    await asyncio.gather(*(s.stop() for s in servers.values()))
                    servers.clear()
                    servers[key] = Server(flags)
                    await servers[key].start()
                detail = await asyncio.wait_for(
                    check(servers[key], check_report, clients), timeout)
                passed += 1
                check_report["result"] = "passed"
                print(f"ok - {name} ({time.monotonic() - started:.1f} s): {detail}", flush=True)
            except Exception as exc:  # noqa: BLE001
                failed += 1
                check_report["result"] = "failed"
                why = (f"timed out after {timeout} s" if isinstance(exc, asyncio.TimeoutError)
                       else f"{type(exc).__name__}: {exc}")
                print(f"FAIL - {name}: {why}", flush=True)
                if not isinstance(exc, CheckFailed):
                    traceback.print_exc()
                for client in clients:
                    print(client.diagnostics(), file=sys.stderr)
                if key in servers:
                    print("--- server output (tail) ---\n" + servers[key].output()[-8000:],
                          file=sys.stderr)
            finally:
                await asyncio.gather(*(c.close() for c in clients))
            report["checks"][name] = check_report
    finally:
        await asyncio.gather(*(s.stop() for s in servers.values()))

    OUTPUT_DIR.mkdir(parents=True, exist_ok=True)
    (OUTPUT_DIR / "aiortc_sfu.json").write_text(json.dumps(report, indent=2, default=str))
    two = report["checks"].get(CHECKS[0][0], {})
    if "srtp_profile" in two:
        print(f"figures: SRTP {two['srtp_profile']}, aiortc DTLS role {two['aiortc_dtls_role']}, "
              f"ms from join {two['timeline_ms_from_join']}, pairs {two['selected_pair']}")
    print(f"interop: {passed} passed, {failed} failed")
    return 0 if failed == 0 and passed > 0 else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
