// Confab browser client.
//
// Speaks the Confab signaling protocol, version 2 (docs/protocol.md): JSON
// text frames over one WebSocket at /ws.
//
// Every client keeps two kinds of peer connection:
// - the *server leg*: one RTCPeerConnection to the server, set up right after
//   `joined` and kept for the whole stay. The server always offers on it; we
//   answer. It carries our media to the server (except in `p2p`, where it is
//   kept warm but silent) and every other member's media back.
// - the *direct leg* (PeerLink): one RTCPeerConnection to the one peer the
//   server names in `p2p` and during the switches, negotiated with the
//   perfect-negotiation pattern; the server says who is polite.
//
// The server owns the media mode (`p2p`, `to_sfu`, `sfu`, `to_p2p`); the client
// follows it make-before-break: a tile keeps showing the path it shows until
// the other path decodes, and only then swaps (each tile has one <video> per
// path, so a swap never blanks it and each member is heard from one path).

const PROTOCOL_VERSION = 2;
/** The reserved participant id of the server's end of our server leg. */
const SFU_ID = 'sfu';
const PING_INTERVAL_MS = 10_000;
/** How long ICE may stay `disconnected` before the impolite side restarts it. */
const ICE_DISCONNECTED_GRACE_MS = 4_000;
/** How long the direct leg may stay down after an ICE restart before we report `p2p_failed`. */
const P2P_FAIL_AFTER_MS = 5_000;
/** Signals from a peer we have no connection for yet are kept (bounded) until its `mode` arrives. */
const MAX_PENDING_SIGNALS = 200;
/** Stats polling while a switch or a tile swap is pending, and otherwise. */
const TICK_BUSY_MS = 100;
const TICK_IDLE_MS = 1_000;
/** A tile swaps to a path that decodes even if its <video> has not reported a frame after this long. */
const SWAP_FRAME_GRACE_MS = 1_000;

const PATHS = Object.freeze(['direct', 'server']);

/** Whether a member shows no video: camera off and no screen shared instead. */
function cameraOff(member) {
  return member.video_muted && !member.screen;
}

/** Frame rate asked of a screen capture: enough for slides and scrolling, cheap to send. */
const SCREEN_FPS = 15;

/**
 * Speaker indication in peer-to-peer mode, where the server sees no media:
 * the browser measures it from getStats, with the server's thresholds (see
 * `active_speakers` in docs/protocol.md).
 */
const SPEAKER_POLL_MS = 250;
/** Mean audio power above -40 dBov (10^(-40/10)) is speech. */
const SPEECH_POWER = 1e-4;
/** A speaker stays marked this long after the last window of speech. */
const SPEAKER_HOLD_MS = 1_000;

/** Labels of the media-path badge. */
const PATH_LABELS = Object.freeze({
  joining: 'joining…',
  waiting: 'waiting for others',
  connecting: 'connecting…',
  reconnecting: 'reconnecting…',
  p2p: 'peer-to-peer',
  relayed: 'relayed',
  sfu: 'via server',
  switching: 'switching…',
  unsupported: 'unsupported mode',
  offline: 'not connected',
});

/** Labels of a server leg's state (`server_leg` messages). */
const LEG_LABELS = Object.freeze({
  connecting: { long: 'server path: connecting…', short: 'server …' },
  connected: { long: 'server path: ready ✓', short: 'server ✓' },
  disconnected: { long: 'server path: unstable', short: 'server ?' },
  failed: { long: 'server path: failed', short: 'server ✗' },
});

// ---------------------------------------------------------------------------
// Wire format helpers

/** RTCIceCandidate (camelCase) → protocol candidate object (snake_case). */
function candidateToWire(candidate) {
  if (!candidate) {
    // End of candidates: an empty `candidate` string.
    return { candidate: '', sdp_mid: null, sdp_mline_index: null, username_fragment: null };
  }
  return {
    candidate: candidate.candidate ?? '',
    sdp_mid: candidate.sdpMid ?? null,
    sdp_mline_index: candidate.sdpMLineIndex ?? null,
    username_fragment: candidate.usernameFragment ?? null,
  };
}

/** Protocol candidate object (snake_case) → RTCIceCandidateInit (camelCase). */
function candidateFromWire(wire) {
  return {
    candidate: typeof wire?.candidate === 'string' ? wire.candidate : '',
    sdpMid: wire?.sdp_mid ?? null,
    sdpMLineIndex: wire?.sdp_mline_index ?? null,
    usernameFragment: wire?.username_fragment ?? null,
  };
}

/**
 * `?relay=1`: gather and use relay (TURN) candidates only, as a client
 * behind a network with no direct path would end up doing.
 */
const RELAY_ONLY = new URLSearchParams(location.search).get('relay') === '1';

/** The RTCConfiguration of every peer connection. */
function rtcConfiguration(iceServers, extra = {}) {
  return { iceServers, ...(RELAY_ONLY ? { iceTransportPolicy: 'relay' } : {}), ...extra };
}

/** `joined.ice_servers` → RTCIceServer[]. */
function iceServersFromWire(list) {
  if (!Array.isArray(list)) return [];
  return list
    .filter((s) => s && (typeof s.urls === 'string' || Array.isArray(s.urls)))
    .map((s) => {
      const server = { urls: s.urls };
      if (s.username != null) server.username = s.username;
      if (s.credential != null) server.credential = s.credential;
      return server;
    });
}

/** Whether a stats report's selected candidate pair has a relay (TURN) candidate on either end. */
function selectedPairRelayed(report) {
  if (!report) return false;
  let pair = null;
  for (const s of report.values()) {
    if (s.type === 'transport' && s.selectedCandidatePairId) pair = report.get(s.selectedCandidatePairId);
  }
  if (!pair) return false;
  const type = (id) => report.get(id)?.candidateType;
  return type(pair.localCandidateId) === 'relay' || type(pair.remoteCandidateId) === 'relay';
}

/** The media sections of an SDP, in order: `{ kind, mid }`. */
function mediaSections(sdp) {
  const sections = [];
  for (const line of String(sdp).split(/\r?\n/)) {
    const m = /^m=(\w+)\s/.exec(line);
    if (m) {
      sections.push({ kind: m[1], mid: null });
      continue;
    }
    const mid = /^a=mid:(\S+)/.exec(line);
    if (mid && sections.length) sections[sections.length - 1].mid = mid[1];
  }
  return sections;
}

function webSocketUrl() {
  const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
  return `${scheme}://${location.host}/ws`;
}

function readJoinParams() {
  const params = new URLSearchParams(location.search);
  return {
    room: (params.get('room') ?? '').trim(),
    name: (params.get('name') ?? '').trim(),
    token: params.get('token') || null,
  };
}

const ROOM_PATTERN = /^[A-Za-z0-9_.-]{1,64}$/;

// ---------------------------------------------------------------------------
// DOM helpers

const $ = (id) => document.getElementById(id);

const views = {
  join: $('join-view'),
  call: $('call-view'),
  ended: $('ended-view'),
};

function showView(name) {
  document.body.dataset.view = name;
  for (const [key, el] of Object.entries(views)) el.hidden = key !== name;
}

function announce(text) {
  const el = $('announcer');
  el.textContent = '';
  // A fresh text node makes screen readers speak repeated messages too.
  requestAnimationFrame(() => { el.textContent = text; });
}

const banner = {
  show(code, message) {
    $('banner-code').textContent = code;
    $('banner-message').textContent = message ?? '';
    $('banner').hidden = false;
  },
  hide() {
    $('banner').hidden = true;
  },
};
$('banner-close').addEventListener('click', () => banner.hide());

function initials(name) {
  const words = String(name ?? '').trim().split(/\s+/).filter(Boolean);
  if (!words.length) return '?';
  const first = [...words[0]][0];
  const last = words.length > 1 ? [...words[words.length - 1]][0] : '';
  return (first + last).toUpperCase();
}

/** Shows a server leg state on a `.leg-state` element; `short` picks the compact label. */
function renderLegState(el, state, { short = false } = {}) {
  const labels = LEG_LABELS[state];
  el.hidden = !labels;
  if (!labels) return;
  el.dataset.state = state;
  el.textContent = short ? labels.short : labels.long;
  el.title = labels.long;
}

// ---------------------------------------------------------------------------
// Video grid

/**
 * One participant's tile: video (or avatar), name, mute indicators, the state
 * of the direct connection and of the member's server leg.
 *
 * A remote tile has one <video> per media path (`direct`, `server`), stacked.
 * Only the rendered one is visible and audible; the other may already play
 * the other path's stream underneath, so that a swap shows decoded frames at
 * once and never a blank tile.
 */
class Tile {
  constructor({ id, name, local = false }) {
    this.id = id;
    this.local = local;
    this.el = $('tile-template').content.firstElementChild.cloneNode(true);
    this.el.dataset.id = id;
    this.el.classList.toggle('local', local);
    this.videos = {};
    for (const path of PATHS) {
      const video = this.el.querySelector(`video[data-path="${path}"]`);
      video.muted = true;
      for (const event of ['loadeddata', 'resize', 'emptied', 'playing']) {
        video.addEventListener(event, () => this.refreshVideoFlag());
      }
      this.videos[path] = video;
    }
    this.streams = { direct: null, server: null };
    this.rendered = null; // 'direct' | 'server' | null
    this.audioBlocked = false;
    this.unmuteButton = this.el.querySelector('.unmute-audio');
    this.unmuteButton.addEventListener('click', () => {
      this.audioBlocked = false;
      this.unmuteButton.hidden = true;
      this.applyAudio();
    });
    this.setName(name);
    this.setMuted({ audio: false, video: false });
    this.show(null);
  }

  setName(name) {
    this.name = name;
    this.el.querySelector('.name').textContent = this.local ? `${name} (you)` : name;
    this.el.querySelector('.avatar').textContent = initials(name);
    const label = this.local ? 'Your camera preview' : `Video of ${name}`;
    for (const video of Object.values(this.videos)) video.setAttribute('aria-label', label);
  }

  /**
   * Microphone and camera state. A shared screen (`screen`) replaces the
   * camera: the tile then shows video, whole (not cropped) and never
   * mirrored, whatever the camera's state.
   */
  setMuted({ audio, video, screen = false }) {
    const cameraOff = Boolean(video) && !screen;
    this.el.querySelector('.mic-off').hidden = !audio;
    this.el.querySelector('.cam-off').hidden = !cameraOff;
    this.el.dataset.cameraOff = String(cameraOff);
    this.el.dataset.screen = String(Boolean(screen));
  }

  /** Attaches `stream` (or nothing) to the <video> of `path`. Does not change what is rendered. */
  setPathStream(path, stream) {
    if (this.streams[path] === stream) return;
    this.streams[path] = stream;
    const video = this.videos[path];
    video.srcObject = stream;
    if (stream) this.play(video);
    if (!stream && this.rendered === path) this.show(null);
    this.applyAudio();
    this.refreshVideoFlag();
  }

  /** Makes `path` the visible and audible one (null: none). */
  show(path) {
    this.rendered = path;
    this.el.dataset.rendered = path ?? 'none';
    const video = path && this.videos[path];
    if (video?.srcObject && video.paused) this.play(video);
    this.applyAudio();
    this.refreshVideoFlag();
  }

  /** Whether the <video> of `path` has a frame to show (or, without a video track, data at all). */
  hasFrame(path) {
    const video = this.videos[path];
    if (!this.streams[path] || video.readyState < 2) return false;
    const hasVideoTrack = this.streams[path].getVideoTracks().some((t) => t.readyState === 'live');
    return !hasVideoTrack || video.videoWidth > 0;
  }

  /** Only the rendered path is heard (and only once the page may play sound). */
  applyAudio() {
    for (const path of PATHS) {
      const video = this.videos[path];
      const muted = this.local || this.audioBlocked || path !== this.rendered;
      if (video.muted === muted) continue;
      video.muted = muted;
      if (!muted && video.srcObject) this.play(video);
    }
  }

  play(video) {
    video.play().catch((err) => {
      if (err?.name !== 'NotAllowedError' || this.local || video.muted) return;
      // Playing with sound was refused: play muted and let the user turn sound on.
      this.audioBlocked = true;
      this.unmuteButton.hidden = false;
      this.applyAudio();
      video.play().catch(() => {});
    });
  }

  refreshVideoFlag() {
    this.el.dataset.video = this.rendered && this.hasFrame(this.rendered) ? 'on' : 'off';
  }

  /** The direct connection's state towards this member, or null to hide it. */
  setConnectionState(state) {
    const el = this.el.querySelector('.conn-state');
    el.hidden = !state;
    el.textContent = state ? `direct: ${state}` : '';
    if (state) this.el.dataset.conn = state;
    else delete this.el.dataset.conn;
  }

  /** The server holds this member's video back (Last-N): show the avatar, not a frozen frame. */
  setHeld(held) {
    if (this.el.dataset.held === String(held)) return;
    this.el.dataset.held = String(held);
    this.el.querySelector('.held-note').hidden = !held;
  }

  /** Marks the tile as a current speaker; the dominant speaker more strongly. */
  setSpeaking(rank) {
    const value = rank === 0 ? 'dominant' : rank > 0 ? 'yes' : null;
    if ((this.el.dataset.speaking ?? null) === value) return;
    if (value) this.el.dataset.speaking = value;
    else delete this.el.dataset.speaking;
  }

  /** The member's server leg state (from `server_leg`), or null to hide it. */
  setServerLeg(state) {
    renderLegState(this.el.querySelector('.leg-state'), state, { short: true });
  }

  remove() {
    for (const video of Object.values(this.videos)) video.srcObject = null;
    this.el.remove();
  }
}

/** Smallest tile width before the grid scrolls instead of shrinking further. */
const MIN_TILE_WIDTH = 160;

/** Share of the stage's height the featured tile takes in speaker view. */
const FEATURE_SHARE = 0.74;

/**
 * Lays tiles out in rows whose column count gives the largest 16:9 tiles
 * (grid view), or one featured tile large above a strip of the others
 * (speaker view).
 */
class TileGrid {
  constructor(el) {
    this.el = el;
    this.tiles = new Map();
    this.view = 'grid'; // 'grid' | 'speaker'
    this.featured = null; // tile id shown large in speaker view
    this.resizeObserver = new ResizeObserver(() => this.layout());
    this.resizeObserver.observe(el);
  }

  get(id) {
    return this.tiles.get(id) ?? null;
  }

  add(tile) {
    this.tiles.get(tile.id)?.remove();
    this.tiles.set(tile.id, tile);
    this.el.append(tile.el);
    this.layout();
    return tile;
  }

  remove(id) {
    const tile = this.tiles.get(id);
    if (!tile) return;
    tile.remove();
    this.tiles.delete(id);
    this.layout();
  }

  clear() {
    for (const tile of this.tiles.values()) tile.remove();
    this.tiles.clear();
    this.layout();
  }

  /** Grid or speaker view. */
  setView(view) {
    this.view = view === 'speaker' ? 'speaker' : 'grid';
    this.el.dataset.view = this.view;
    this.layout();
  }

  /** The tile shown large in speaker view (null: none). */
  setFeatured(id) {
    if (this.featured === id) return;
    this.featured = id;
    this.layout();
  }

  layout() {
    const featured = this.view === 'speaker' && this.tiles.size > 1 ? this.tiles.get(this.featured) : null;
    for (const tile of this.tiles.values()) tile.el.classList.toggle('featured', tile === featured);
    const n = Math.max(1, this.tiles.size - (featured ? 1 : 0));
    const style = getComputedStyle(this.el);
    const gap = parseFloat(style.columnGap) || 0;
    const width = this.el.clientWidth - (parseFloat(style.paddingLeft) || 0) - (parseFloat(style.paddingRight) || 0);
    let height = this.el.clientHeight - (parseFloat(style.paddingTop) || 0) - (parseFloat(style.paddingBottom) || 0);
    if (width <= 0 || height <= 0) return;
    if (featured) {
      // The featured tile on its own row; the others share what is left.
      const featureW = Math.floor(Math.min(width, (height * FEATURE_SHARE * 16) / 9));
      this.el.style.setProperty('--feature-w', `${featureW}px`);
      this.el.style.setProperty('--feature-h', `${Math.floor((featureW * 9) / 16)}px`);
      height -= Math.floor((featureW * 9) / 16) + gap;
    }
    let best = { cols: 1, w: 0 };
    for (let cols = 1; cols <= n; cols++) {
      const rows = Math.ceil(n / cols);
      const cellW = (width - gap * (cols - 1)) / cols;
      const cellH = (height - gap * (rows - 1)) / rows;
      const w = Math.min(cellW, (cellH * 16) / 9);
      if (w > best.w) best = { cols, w };
    }
    let tileW = Math.floor(best.w);
    let scroll = false;
    if (tileW < MIN_TILE_WIDTH) {
      // Too many tiles for the height: keep them legible and scroll instead.
      const cols = Math.max(1, Math.floor((width + gap) / (MIN_TILE_WIDTH + gap)));
      tileW = Math.floor(Math.min(width, (width - gap * (cols - 1)) / cols));
      scroll = true;
    }
    tileW = Math.max(0, tileW);
    this.el.style.setProperty('--tile-w', `${tileW}px`);
    this.el.style.setProperty('--tile-h', `${Math.floor((tileW * 9) / 16)}px`);
    this.el.dataset.count = String(this.tiles.size);
    this.el.dataset.size = tileW < 280 ? 'small' : 'normal';
    this.el.classList.toggle('scroll', scroll);
  }
}

// ---------------------------------------------------------------------------
// Direct leg: one RTCPeerConnection to one peer, perfect negotiation.

class PeerLink {
  /**
   * @param {object} opts
   * @param {string} opts.peerId      the other member's participant id
   * @param {boolean} opts.polite     our role in perfect negotiation (from `mode`)
   * @param {RTCIceServer[]} opts.iceServers
   * @param {MediaStream|null} opts.localStream
   * @param {(msg: object) => void} opts.signal   sends offer/answer/candidate to the peer
   * @param {(stream: MediaStream) => void} opts.onRemoteStream
   * @param {() => void} opts.onStateChange
   * @param {() => void} opts.onFailed   ICE failed and a restart did not bring it back in time
   */
  constructor({ peerId, polite, iceServers, localStream, signal, onRemoteStream, onStateChange, onFailed }) {
    this.peerId = peerId;
    this.polite = polite;
    this.signal = signal;
    this.onRemoteStream = onRemoteStream;
    this.onStateChange = onStateChange;
    this.onFailed = onFailed;
    this.makingOffer = false;
    this.ignoreOffer = false;
    this.settingRemoteAnswer = false;
    this.closed = false;
    this.disconnectedTimer = null;
    this.failTimer = null;
    this.failedReported = false;
    this.remoteStream = null;

    const pc = new RTCPeerConnection(rtcConfiguration(iceServers));
    this.pc = pc;
    pc.addEventListener('negotiationneeded', () => this.negotiate());
    pc.addEventListener('icecandidate', (e) => this.sendCandidate(e.candidate));
    pc.addEventListener('track', (e) => this.onTrack(e));
    pc.addEventListener('connectionstatechange', () => this.onStateChange());
    pc.addEventListener('iceconnectionstatechange', () => this.onIceStateChange());

    const kinds = new Set();
    this.videoSender = null;
    for (const track of localStream?.getTracks() ?? []) {
      const sender = pc.addTrack(track, localStream);
      if (track.kind === 'video') this.videoSender = sender;
      kinds.add(track.kind);
    }
    // The impolite side's offer always carries audio and video, so the other
    // side can send both even when we have no camera or microphone.
    if (!polite) {
      for (const kind of ['audio', 'video']) {
        if (!kinds.has(kind)) pc.addTransceiver(kind, { direction: 'recvonly' });
      }
    }
  }

  log(...args) {
    console.debug(`[confab p2p ${this.peerId}]`, ...args);
  }

  async negotiate() {
    const pc = this.pc;
    if (this.closed || pc.signalingState !== 'stable') return;
    // The impolite member sends the first offer; the polite one waits for it.
    if (this.polite && !pc.remoteDescription) return;
    try {
      this.makingOffer = true;
      await pc.setLocalDescription();
      if (this.closed || pc.localDescription?.type !== 'offer') return;
      this.signal({ type: 'offer', sdp: pc.localDescription.sdp });
    } catch (err) {
      this.log('creating an offer failed', err);
    } finally {
      this.makingOffer = false;
    }
  }

  /** An `offer` or `answer` from the peer. */
  async handleDescription(description) {
    const pc = this.pc;
    if (this.closed) return;
    try {
      const readyForOffer = !this.makingOffer
        && (pc.signalingState === 'stable' || this.settingRemoteAnswer);
      const collision = description.type === 'offer' && !readyForOffer;
      this.ignoreOffer = !this.polite && collision;
      if (this.ignoreOffer) {
        this.log('ignoring a colliding offer (impolite side)');
        return;
      }
      this.settingRemoteAnswer = description.type === 'answer';
      if (collision) {
        // Polite side of a collision: roll our own offer back, take theirs.
        await Promise.all([
          pc.setLocalDescription({ type: 'rollback' }),
          pc.setRemoteDescription(description),
        ]);
      } else {
        await pc.setRemoteDescription(description);
      }
      this.settingRemoteAnswer = false;
      if (description.type === 'offer' && !this.closed) {
        await pc.setLocalDescription();
        this.signal({ type: 'answer', sdp: pc.localDescription.sdp });
      }
    } catch (err) {
      this.settingRemoteAnswer = false;
      this.log(`applying the remote ${description.type} failed`, err);
    }
  }

  /** Sends `track` (the screen, or the camera again) on the video sender; no renegotiation. */
  setVideoTrack(track) {
    if (this.closed || !this.videoSender || this.videoSender.track === track) return;
    this.videoSender.replaceTrack(track).catch((err) => this.log('replaceTrack failed', err));
  }

  /** A `candidate` from the peer (protocol form). */
  async handleCandidate(wire) {
    if (this.closed) return;
    try {
      await this.pc.addIceCandidate(candidateFromWire(wire));
    } catch (err) {
      // Candidates of an offer we ignored are expected to fail.
      if (!this.ignoreOffer) this.log('adding a remote candidate failed', err);
    }
  }

  sendCandidate(candidate) {
    if (this.closed) return;
    this.signal({ type: 'candidate', candidate: candidateToWire(candidate) });
  }

  onTrack({ track, streams }) {
    let stream = streams[0];
    if (!stream) {
      this.remoteStream ??= new MediaStream();
      this.remoteStream.addTrack(track);
      stream = this.remoteStream;
    }
    this.remoteStream = stream;
    this.onRemoteStream(stream);
  }

  /** The receiving track of each kind: `{ audio, video }` (null when absent). */
  remoteTracks() {
    const tracks = { audio: null, video: null };
    if (this.closed) return tracks;
    for (const t of this.pc.getTransceivers()) {
      const track = t.receiver?.track;
      if (!track || !t.mid || tracks[track.kind]) continue;
      if (t.currentDirection === 'sendrecv' || t.currentDirection === 'recvonly') tracks[track.kind] = track;
    }
    return tracks;
  }

  isUp() {
    return ['connected', 'completed'].includes(this.pc.iceConnectionState);
  }

  onIceStateChange() {
    const state = this.pc.iceConnectionState;
    clearTimeout(this.disconnectedTimer);
    this.disconnectedTimer = null;
    if (this.isUp()) {
      clearTimeout(this.failTimer);
      this.failTimer = null;
    } else if (state === 'failed') {
      this.restartIce('failed');
    } else if (state === 'disconnected') {
      this.disconnectedTimer = setTimeout(() => {
        if (!this.closed && this.pc.iceConnectionState === 'disconnected') this.restartIce('disconnected');
      }, ICE_DISCONNECTED_GRACE_MS);
    }
    this.onStateChange();
  }

  /** The impolite side restarts ICE; the polite side waits for its offer. Either reports a lasting failure. */
  restartIce(reason) {
    if (this.closed) return;
    if (!this.failTimer && !this.failedReported) {
      this.failTimer = setTimeout(() => {
        this.failTimer = null;
        if (this.closed || this.isUp() || this.failedReported) return;
        this.failedReported = true;
        this.log('the direct path did not recover');
        this.onFailed();
      }, P2P_FAIL_AFTER_MS);
    }
    if (this.polite) {
      this.log(`ICE ${reason}; waiting for the peer to restart it`);
      return;
    }
    this.log(`ICE ${reason}; restarting`);
    this.pc.restartIce(); // fires negotiationneeded → offer with new ICE credentials
  }

  close() {
    if (this.closed) return;
    this.closed = true;
    clearTimeout(this.disconnectedTimer);
    clearTimeout(this.failTimer);
    this.pc.close();
  }
}

// ---------------------------------------------------------------------------
// Server leg: one RTCPeerConnection to the server, offered by the server.

class ServerLeg {
  /**
   * @param {object} opts
   * @param {RTCIceServer[]} opts.iceServers
   * @param {MediaStream|null} opts.localStream
   * @param {(msg: object) => void} opts.signal   sends answer/candidate to `sfu`
   * @param {(memberId: string, stream: MediaStream, track: MediaStreamTrack) => void} opts.onTrack
   * @param {() => void} opts.onStateChange
   */
  constructor({ iceServers, localStream, signal, onTrack, onStateChange }) {
    this.localStream = localStream;
    this.videoOverride = null; // the screen while it is shared
    this.signal = signal;
    this.onTrackCallback = onTrack;
    this.closed = false;
    this.sending = false;
    this.senders = { audio: null, video: null };
    this.bound = false;
    this.answered = false;
    this.queuedCandidates = [];
    this.chain = Promise.resolve();
    this.offersAnswered = 0;

    const pc = new RTCPeerConnection(rtcConfiguration(iceServers, { bundlePolicy: 'max-bundle' }));
    this.pc = pc;
    // The server makes every offer: `negotiationneeded` is ignored on purpose.
    pc.addEventListener('icecandidate', (e) => this.sendCandidate(e.candidate));
    pc.addEventListener('track', (e) => this.onTrack(e));
    pc.addEventListener('connectionstatechange', onStateChange);
    pc.addEventListener('iceconnectionstatechange', onStateChange);

    // Before the first offer is applied: tracks added with addTrack take the
    // offer's first audio and first video section (our upstream). For a kind
    // we lack, addTransceiver() would not help: browsers only pair remote
    // offer sections with transceivers created by addTrack. bind() makes the
    // section's own transceiver sendonly instead, with no track.
    const kinds = new Set();
    for (const track of localStream?.getTracks() ?? []) {
      if (kinds.has(track.kind)) continue;
      pc.addTrack(track, localStream);
      kinds.add(track.kind);
    }
  }

  log(...args) {
    console.debug('[confab server leg]', ...args);
  }

  /** An `offer` from `sfu`. Offers and candidates are applied strictly in order. */
  handleOffer(sdp) {
    this.chain = this.chain.then(() => this.applyOffer(sdp)).catch((err) => this.log('applying an offer failed', err));
    return this.chain;
  }

  async applyOffer(sdp) {
    if (this.closed) return;
    const pc = this.pc;
    await pc.setRemoteDescription({ type: 'offer', sdp });
    if (this.closed) return;
    if (!this.bound) this.bind(sdp);
    await this.applySending();
    await pc.setLocalDescription();
    if (this.closed) return;
    this.signal({ type: 'answer', sdp: pc.localDescription.sdp });
    this.offersAnswered += 1;
    if (!this.answered) {
      this.answered = true;
      for (const candidate of this.queuedCandidates.splice(0)) this.sendCandidate(candidate);
    }
  }

  /** Finds the transceivers of the offer's first audio and video sections: they carry our media. */
  bind(sdp) {
    this.bound = true;
    const transceivers = this.pc.getTransceivers();
    for (const kind of ['audio', 'video']) {
      const section = mediaSections(sdp).find((s) => s.kind === kind);
      const transceiver = section && transceivers.find((t) => t.mid === section.mid);
      if (!transceiver) {
        this.log(`the offer has no ${kind} section for our media`);
        continue;
      }
      transceiver.direction = 'sendonly';
      this.senders[kind] = transceiver.sender;
      if (this.localStream && transceiver.sender.setStreams) {
        try { transceiver.sender.setStreams(this.localStream); } catch { /* optional */ }
      }
    }
  }

  /** `true`: our media goes to the server (every mode but `p2p`); `false`: warm but silent. */
  setSending(on) {
    if (this.sending === on) return;
    this.sending = on;
    if (this.bound) {
      this.chain = this.chain.then(() => this.applySending()).catch((err) => this.log('replaceTrack failed', err));
    }
  }

  /** Sends `track` instead of the camera (null: the camera again). */
  setVideoOverride(track) {
    this.videoOverride = track;
    if (this.bound) {
      this.chain = this.chain.then(() => this.applySending()).catch((err) => this.log('replaceTrack failed', err));
    }
  }

  async applySending() {
    for (const kind of ['audio', 'video']) {
      const sender = this.senders[kind];
      if (!sender || this.closed) continue;
      const own = (kind === 'video' && this.videoOverride) || this.localStream?.getTracks().find((t) => t.kind === kind);
      const track = this.sending ? (own ?? null) : null;
      if (sender.track !== track) await sender.replaceTrack(track);
    }
  }

  /** A `candidate` from `sfu` (the server does not trickle, but may). */
  handleCandidate(wire) {
    this.chain = this.chain.then(async () => {
      if (this.closed || !this.pc.remoteDescription) return;
      try {
        await this.pc.addIceCandidate(candidateFromWire(wire));
      } catch (err) {
        this.log('adding a server candidate failed', err);
      }
    });
  }

  sendCandidate(candidate) {
    if (this.closed) return;
    if (!this.answered) {
      this.queuedCandidates.push(candidate);
      return;
    }
    this.signal({ type: 'candidate', candidate: candidateToWire(candidate) });
  }

  onTrack({ track, streams }) {
    // Each other member's sections carry `a=msid:<participant id> <track id>`.
    const stream = streams[0];
    if (!stream?.id) {
      this.log('a server track without a stream id', track.id);
      return;
    }
    this.onTrackCallback(stream.id, stream, track);
  }

  close() {
    if (this.closed) return;
    this.closed = true;
    this.pc.close();
  }
}

// ---------------------------------------------------------------------------
// Local media

async function acquireLocalMedia() {
  const attempts = [
    { audio: true, video: { width: { ideal: 1280 }, height: { ideal: 720 } } },
    { audio: true, video: false },
    { audio: false, video: true },
  ];
  let lastError = null;
  for (const constraints of attempts) {
    try {
      return { stream: await navigator.mediaDevices.getUserMedia(constraints), error: null };
    } catch (err) {
      lastError = err;
      // Only a missing device is worth another try with fewer devices.
      if (!['NotFoundError', 'NotReadableError', 'OverconstrainedError'].includes(err?.name)) break;
    }
  }
  return { stream: null, error: lastError };
}

// ---------------------------------------------------------------------------
// A session: one join of one room, from `join` until leave or disconnect.

class Session {
  constructor({ room, name, token }) {
    this.room = room;
    this.name = name;
    this.token = token;
    this.ws = null;
    this.joined = false;
    this.participantId = null;
    this.members = new Map(); // id → { id, name, audio_muted, video_muted, server_leg }
    this.iceServers = [];
    this.mode = null; // { mode, peer, polite, epoch }
    this.modeSince = 0; // performance.now() of the last mode change
    this.link = null; // PeerLink to the current peer, while one is wanted
    this.serverLeg = null; // ServerLeg, from `joined` on
    this.serverLegState = null; // our own leg as the server sees it (`server_leg`)
    this.serverMedia = new Map(); // member id → MediaStream from the server leg
    this.pendingSignals = [];
    this.localStream = null;
    this.audioMuted = false;
    this.videoMuted = false;
    this.screenTrack = null; // the shared screen, sent in place of the camera
    this.pingTimer = null;
    this.tickTimer = null;
    this.ticking = false;
    this.counters = new Map(); // receiving track id → { value, epoch, risen }
    this.decodingSince = new Map(); // `${member}/${path}` → performance.now() when first seen decoding
    this.readySent = new Set(); // epochs we sent media_ready for
    this.directRelayed = false; // the direct leg's selected pair has a relay candidate
    this.p2pFailedSent = false;
    this.ended = false;
    this.leaving = false;
    this.lastError = null;
    this.grid = grid;
    this.localTile = null;
    this.log = []; // { at, event, ... }: mode changes, swaps and reports, for debugging
    this.forwardedVideo = null; // Set of member ids (Last-N), or null: every video is forwarded
    this.speakers = []; // tile ids speaking, dominant first ('local' for us)
    this.lastDominant = null; // the latest remote dominant speaker, for speaker view
    this.speakersSource = null; // where the list came from: 'server' or 'stats'
    this.speakerTimer = null;
    this.localSpeech = new Map(); // tile id → { energy, duration, lastSpeech } for p2p
  }

  record(event, detail = {}) {
    this.log.push({ at: Math.round(performance.now()), event, ...detail });
    if (this.log.length > 200) this.log.splice(0, this.log.length - 200);
  }

  // --- lifecycle -----------------------------------------------------------

  async start() {
    showView('call');
    $('room-name').textContent = this.room;
    document.title = `${this.room} · Confab`;
    this.grid.clear();
    chat.reset();
    this.localTile = this.grid.add(new Tile({ id: 'local', name: this.name, local: true }));
    this.updatePath();
    this.updateControls();

    const { stream, error } = await acquireLocalMedia();
    if (this.ended) {
      stream?.getTracks().forEach((t) => t.stop());
      return;
    }
    this.localStream = stream;
    if (!stream) {
      banner.show('media_unavailable', `Camera and microphone are not available (${error?.name ?? 'unknown error'}). You can still see and hear others.`);
    }
    if (!stream?.getAudioTracks().length) this.audioMuted = true;
    if (!stream?.getVideoTracks().length) this.videoMuted = true;
    if (stream?.getVideoTracks().length) {
      this.localTile.setPathStream('direct', stream);
      this.localTile.show('direct');
    }
    this.updateControls();
    this.connect();
  }

  connect() {
    const ws = new WebSocket(webSocketUrl());
    this.ws = ws;
    ws.addEventListener('open', () => {
      const join = { type: 'join', v: PROTOCOL_VERSION, room: this.room, name: this.name };
      if (this.token) join.token = this.token;
      this.send(join);
    });
    ws.addEventListener('message', (e) => {
      if (typeof e.data === 'string') this.onMessage(e.data);
    });
    ws.addEventListener('close', (e) => this.onSocketClosed(e));
  }

  send(msg) {
    if (this.ws?.readyState === WebSocket.OPEN) this.ws.send(JSON.stringify(msg));
  }

  leave() {
    if (this.ended) return;
    this.leaving = true;
    this.send({ type: 'leave' });
    this.teardown();
    this.ws?.close(1000);
    showEnded('You left the room', '');
  }

  onSocketClosed(event) {
    if (this.ended) return;
    this.teardown();
    // An error that closes the socket arrives just before the close.
    const error = this.lastError && performance.now() - this.lastError.at < 5_000 ? this.lastError : null;
    const reason = error
      ? `The server closed the connection: ${error.code}${error.message ? ` (${error.message})` : ''}.`
      : `The connection to the server was lost (close code ${event.code}).`;
    // A server going away (a rolling update drains it), refusing new rooms
    // while draining, or a lost connection: rejoin by itself, with backoff.
    // Anything the user or an operator must act on (tokens, removed,
    // replaced, room full) ends the call.
    const transient = error
      ? RETRYABLE_ERRORS.has(error.code)
      : event.code !== 1000 && event.code !== 1008;
    if (transient && reconnect.attempts < RECONNECT_ATTEMPTS) {
      const delay = Math.min(RECONNECT_MAX_MS, RECONNECT_BASE_MS * 2 ** reconnect.attempts) * (0.75 + 0.5 * Math.random());
      reconnect.attempts += 1;
      reconnect.history.push({ at: Math.round(performance.now()), attempt: reconnect.attempts, delayMs: Math.round(delay), reason: error?.code ?? event.code });
      if (reconnect.history.length > 20) reconnect.history.shift();
      showEnded('Reconnecting…', `${reason} Rejoining in ${Math.ceil(delay / 1000)} s (attempt ${reconnect.attempts} of ${RECONNECT_ATTEMPTS}).`);
      clearTimeout(reconnect.timer);
      reconnect.timer = setTimeout(() => startSession(readJoinParams()), delay);
      return;
    }
    showEnded('Disconnected', reason);
  }

  teardown() {
    this.ended = true;
    this.joined = false;
    clearInterval(this.pingTimer);
    clearTimeout(this.tickTimer);
    clearInterval(this.speakerTimer);
    this.closeLink();
    this.serverLeg?.close();
    this.serverMedia.clear();
    this.localStream?.getTracks().forEach((t) => t.stop());
    this.screenTrack?.stop();
    this.screenTrack = null;
    this.grid.clear();
    this.updatePath();
  }

  // --- protocol ------------------------------------------------------------

  onMessage(text) {
    let msg;
    try {
      msg = JSON.parse(text);
    } catch {
      return;
    }
    if (!msg || typeof msg.type !== 'string') return;
    switch (msg.type) {
      case 'joined': return this.onJoined(msg);
      case 'participant_joined': return this.onParticipantJoined(msg.participant);
      case 'participant_left': return this.onParticipantLeft(msg);
      case 'participant_updated': return this.onParticipantUpdated(msg);
      case 'mode': return this.applyMode(msg);
      case 'server_leg': return this.onServerLeg(msg);
      case 'active_speakers': return this.onActiveSpeakers(msg);
      case 'chat': return this.onChat(msg);
      case 'forwarded_video': return this.onForwardedVideo(msg);
      case 'offer':
      case 'answer':
      case 'candidate': return this.onSignal(msg);
      case 'pong': return undefined;
      case 'error': return this.onError(msg);
      default: return undefined; // later additions: ignore
    }
  }

  onJoined(msg) {
    this.joined = true;
    reconnect.attempts = 0;
    this.participantId = msg.participant_id;
    this.iceServers = iceServersFromWire(msg.ice_servers);
    this.record('joined', { v: msg.v, participantId: this.participantId });
    // The server leg exists before anything else, so the server's first offer finds it.
    this.serverLeg = new ServerLeg({
      iceServers: this.iceServers,
      localStream: this.localStream,
      signal: (m) => this.send({ ...m, to: SFU_ID }),
      onTrack: (id, stream, track) => this.onServerTrack(id, stream, track),
      onStateChange: () => this.updatePath(),
    });
    this.serverLegState = 'connecting';
    for (const member of msg.members ?? []) this.addMember(member);
    this.pingTimer = setInterval(() => this.send({ type: 'ping' }), PING_INTERVAL_MS);
    this.updateControls(); // screen sharing needs the join
    this.speakerTimer = setInterval(() => this.measureSpeakers(), SPEAKER_POLL_MS);
    if (this.audioMuted || this.videoMuted) this.sendMediaState();
    if (msg.mode) this.applyMode(msg.mode);
    this.updatePath();
    this.kick();
  }

  onParticipantJoined(participant) {
    if (!participant?.id) return;
    this.addMember(participant);
    announce(`${participant.name} joined`);
    this.kick();
  }

  onParticipantLeft({ id }) {
    const member = this.members.get(id);
    this.members.delete(id);
    this.refreshChatMembers();
    this.serverMedia.delete(id);
    for (const path of PATHS) this.decodingSince.delete(`${id}/${path}`);
    if (this.link?.peerId === id) this.closeLink();
    this.grid.remove(id);
    this.chooseFeatured();
    this.updateMemberCount();
    if (member) announce(`${member.name} left`);
    this.kick();
  }

  onParticipantUpdated(msg) {
    const member = this.members.get(msg.id);
    if (!member) return;
    if (typeof msg.audio_muted === 'boolean') member.audio_muted = msg.audio_muted;
    if (typeof msg.video_muted === 'boolean') member.video_muted = msg.video_muted;
    member.screen = Boolean(msg.screen);
    const tile = this.grid.get(msg.id);
    tile?.setMuted({ audio: member.audio_muted, video: member.video_muted, screen: member.screen });
    this.chooseFeatured();
    this.kick();
  }

  onServerLeg({ id, state }) {
    if (typeof id !== 'string' || typeof state !== 'string') return;
    if (id === this.participantId) {
      this.serverLegState = state;
      this.record('server_leg', { state });
      this.updatePath();
      return;
    }
    const member = this.members.get(id);
    if (!member) return;
    member.server_leg = state;
    this.grid.get(id)?.setServerLeg(state);
  }

  // --- chat ----------------------------------------------------------------

  onChat({ from, name, text, private: isPrivate, at }) {
    if (typeof text !== 'string' || typeof from !== 'string') return;
    chat.add({
      from,
      name: typeof name === 'string' ? name : (this.members.get(from)?.name ?? from),
      text,
      private: Boolean(isPrivate),
      mine: false,
      at: typeof at === 'number' ? at : Date.now(),
    });
  }

  /** Sends a chat message to the room, or to member `to`. False if it cannot be sent. */
  sendChat(text, to) {
    const body = text.trim();
    if (!this.joined || !body || [...body].length > CHAT_MAX_CHARS) return false;
    if (to && !this.members.has(to)) {
      chat.notice('That person has left the room: the message was not sent. Choose another recipient.');
      return false;
    }
    this.send(to ? { type: 'chat', text: body, to } : { type: 'chat', text: body });
    chat.add({
      from: this.participantId,
      name: this.name,
      text: body,
      private: Boolean(to),
      toName: to ? this.members.get(to).name : null,
      mine: true,
      at: Date.now(),
    });
    return true;
  }

  refreshChatMembers() {
    chat.setMembers([...this.members.values()]);
  }

  // --- active speakers -----------------------------------------------------

  /** The server's list, while media goes through it. */
  onActiveSpeakers({ speakers }) {
    if (!Array.isArray(speakers) || this.mode?.mode === 'p2p') return;
    const ids = speakers
      .map((s) => (s?.id === this.participantId ? 'local' : s?.id))
      .filter((id) => typeof id === 'string');
    this.setSpeakers(ids, 'server');
  }

  /** In peer-to-peer mode: who speaks, from the direct leg's stats and our own microphone's. */
  async measureSpeakers() {
    if (this.mode?.mode !== 'p2p') {
      this.localSpeech.clear();
      // Marks measured here are stale now; the server's lists take over.
      if (this.speakersSource === 'stats' && this.speakers.length) this.setSpeakers([], 'stats');
      return;
    }
    const link = this.link;
    const pc = link?.pc;
    const report = pc && pc.connectionState === 'connected' ? await pc.getStats().catch(() => null) : null;
    if (this.mode?.mode !== 'p2p' || this.link !== link) return;
    const now = performance.now();
    const seen = [];
    for (const s of report?.values() ?? []) {
      // The peer's audio as received, and our microphone as sent.
      const id = s.type === 'inbound-rtp' && s.kind === 'audio' ? link.peerId
        : s.type === 'media-source' && s.kind === 'audio' && !this.audioMuted ? 'local' : null;
      if (!id || typeof s.totalAudioEnergy !== 'number' || typeof s.totalSamplesDuration !== 'number') continue;
      seen.push(id);
      const prev = this.localSpeech.get(id);
      const entry = { energy: s.totalAudioEnergy, duration: s.totalSamplesDuration, lastSpeech: prev?.lastSpeech ?? -Infinity, power: 0 };
      if (prev && entry.duration > prev.duration) {
        entry.power = (entry.energy - prev.energy) / (entry.duration - prev.duration);
        if (entry.power > SPEECH_POWER) entry.lastSpeech = now;
      }
      this.localSpeech.set(id, entry);
    }
    for (const id of this.localSpeech.keys()) if (!seen.includes(id)) this.localSpeech.delete(id);
    const speaking = [...this.localSpeech.entries()]
      .filter(([, e]) => now - e.lastSpeech < SPEAKER_HOLD_MS)
      .sort(([, a], [, b]) => b.power - a.power)
      .map(([id]) => id);
    this.setSpeakers(speaking, 'stats');
  }

  /** `source`: 'server' (active_speakers) or 'stats' (measured here, peer-to-peer). */
  setSpeakers(ids, source) {
    const changed = ids.length !== this.speakers.length || ids.some((id, i) => id !== this.speakers[i]);
    this.speakersSource = source;
    if (!changed) return;
    this.speakers = ids;
    this.record('speakers', { ids, source });
    for (const [id, tile] of this.grid.tiles) tile.setSpeaking(ids.indexOf(id));
    this.chooseFeatured();
  }

  /**
   * Speaker view's large tile: a member sharing a screen, else the latest
   * remote dominant speaker (kept through silence), else the first member.
   */
  chooseFeatured() {
    const sharing = [...this.members.values()].find((m) => m.screen);
    const dominant = this.speakers[0];
    if (dominant && dominant !== 'local' && this.members.has(dominant)) this.lastDominant = dominant;
    if (!this.members.has(this.lastDominant)) this.lastDominant = null;
    const first = this.members.keys().next().value ?? null;
    this.grid.setFeatured(sharing?.id ?? this.lastDominant ?? first);
  }

  onError({ code, message }) {
    // The server answers a refused chat message at once, and never for a delivered one.
    if (code === 'rate_limited' || code === 'not_a_member') chat.refused(String(message ?? code));
    this.lastError = { code: String(code ?? 'error'), message: message ?? '', at: performance.now() };
    console.warn('[confab] server error', code, message);
    banner.show(this.lastError.code, this.lastError.message);
  }

  addMember(raw) {
    const previous = this.members.get(raw.id);
    const member = {
      id: raw.id,
      name: raw.name ?? raw.id,
      audio_muted: Boolean(raw.audio_muted),
      video_muted: Boolean(raw.video_muted),
      screen: Boolean(raw.screen),
      server_leg: previous?.server_leg ?? null,
    };
    this.members.set(member.id, member);
    this.refreshChatMembers();
    const tile = this.grid.get(member.id) ?? this.grid.add(new Tile({ id: member.id, name: member.name }));
    tile.setName(member.name);
    tile.setMuted({ audio: member.audio_muted, video: member.video_muted, screen: member.screen });
    tile.setServerLeg(member.server_leg ?? 'connecting');
    tile.setSpeaking(this.speakers.indexOf(member.id));
    this.chooseFeatured();
    this.updateMemberCount();
  }

  /** `mode` (also embedded in `joined`). */
  applyMode(msg) {
    if (this.mode && typeof msg.epoch === 'number' && msg.epoch < this.mode.epoch) return; // stale
    const previous = this.mode;
    this.mode = {
      mode: msg.mode,
      peer: msg.peer ?? null,
      polite: Boolean(msg.polite),
      epoch: msg.epoch,
    };
    this.modeSince = performance.now();
    this.record('mode', { ...this.mode, from: previous?.mode ?? null });
    const { mode, peer, polite } = this.mode;
    switch (mode) {
      case 'p2p':
      case 'to_p2p':
        // Keep or build the direct leg to `peer` (none while alone).
        if (peer) this.ensureLink(peer, polite);
        else this.closeLink();
        break;
      case 'to_sfu':
        // Keep the direct leg to the old peer (if any) until the server path decodes.
        if (this.link && this.link.peerId !== peer) this.closeLink();
        break;
      case 'sfu':
        this.closeLink();
        break;
      default:
        console.warn('[confab] unknown media mode', mode);
        break;
    }
    if (!this.link) this.pendingSignals = [];
    // Warm but silent in `p2p`; our media goes to the server in every other mode.
    this.serverLeg?.setSending(mode !== 'p2p');
    this.reconcile();
    this.updatePath();
    this.kick();
  }

  ensureLink(peer, polite) {
    if (this.link && this.link.peerId === peer) {
      this.link.polite = polite;
      return;
    }
    this.closeLink();

    this.grid.get(peer) ?? this.grid.add(new Tile({ id: peer, name: this.members.get(peer)?.name ?? '…' }));
    this.p2pFailedSent = false;
    const link = new PeerLink({
      peerId: peer,
      polite,
      iceServers: this.iceServers,
      localStream: this.localStream,
      signal: (msg) => this.send({ ...msg, to: peer }),
      onRemoteStream: () => this.kick(),
      onStateChange: () => { this.updatePath(); this.kick(); },
      onFailed: () => this.reportP2pFailed(link),
    });
    this.link = link;
    if (this.screenTrack) link.setVideoTrack(this.screenTrack);
    this.record('direct_leg', { peer, polite });
    // Replay anything the peer sent before we knew it was our peer.
    const pending = this.pendingSignals;
    this.pendingSignals = [];
    for (const msg of pending) if (msg.from === peer) this.onSignal(msg);
  }

  reportP2pFailed(link) {
    if (link !== this.link || this.p2pFailedSent) return;
    if (!['p2p', 'to_p2p'].includes(this.mode?.mode)) return;
    this.p2pFailedSent = true;
    this.record('p2p_failed', { peer: link.peerId });
    this.send({ type: 'p2p_failed' });
  }

  /** Closes the direct leg; tiles that showed it fall back to the server path. */
  closeLink() {
    const link = this.link;
    this.pendingSignals = [];
    if (!link) return;
    this.link = null;
    link.close();
    this.record('direct_leg_closed', { peer: link.peerId });
    const tile = this.grid.get(link.peerId);
    if (this.members.has(link.peerId)) {
      tile?.setConnectionState(null);
      this.reconcile();
    } else {
      this.grid.remove(link.peerId);
    }
    this.updatePath();
  }

  onSignal(msg) {
    if (msg.from === SFU_ID) {
      if (!this.serverLeg) return;
      if (msg.type === 'offer' && typeof msg.sdp === 'string') {
        this.record('server_offer', { sections: mediaSections(msg.sdp).length });
        this.serverLeg.handleOffer(msg.sdp).then(() => this.kick());
      } else if (msg.type === 'candidate') {
        this.serverLeg.handleCandidate(msg.candidate);
      }
      return;
    }
    const link = this.link;
    if (!link || link.peerId !== msg.from) {
      // Keep what our coming peer sends before its `mode` reached us; drop
      // late messages of a direct leg we already closed.
      const expected = !this.mode || this.mode.peer === msg.from;
      if (expected && this.pendingSignals.length < MAX_PENDING_SIGNALS) this.pendingSignals.push(msg);
      return;
    }
    if (msg.type === 'candidate') {
      link.handleCandidate(msg.candidate);
    } else if (typeof msg.sdp === 'string') {
      link.handleDescription({ type: msg.type, sdp: msg.sdp });
    }
  }

  onServerTrack(id, stream, track) {
    this.serverMedia.set(id, stream);
    this.record('server_track', { member: id, kind: track.kind });
    this.kick();
  }

  // --- paths, swaps and readiness ----------------------------------------

  /** The receiving tracks of `path` for member `id`: `{ audio, video }`. */
  pathTracks(id, path) {
    if (path === 'direct') {
      if (!this.link || this.link.peerId !== id || this.link.closed) return { audio: null, video: null };
      return this.link.remoteTracks();
    }
    const stream = this.serverMedia.get(id);
    return {
      audio: stream?.getAudioTracks()[0] ?? null,
      video: stream?.getVideoTracks()[0] ?? null,
    };
  }

  /** The stream a tile attaches for `path`, or null. */
  pathStream(id, path) {
    if (path === 'direct') {
      const link = this.link;
      return link && link.peerId === id && !link.closed ? link.remoteStream : null;
    }
    return this.serverMedia.get(id) ?? null;
  }

  /** The path member `id` should be rendered from in the current mode. */
  wantedPath(id) {
    const mode = this.mode?.mode;
    return (mode === 'p2p' || mode === 'to_p2p') && this.mode.peer === id ? 'direct' : 'server';
  }

  /**
   * Whether member `id`'s media decodes on `path` now: its video's
   * framesDecoded rose between two samples taken in the current epoch (for a
   * member that sends no video: its audio's packetsReceived). Sampling within
   * the epoch matters: a server-leg receiver keeps its counters from an
   * earlier server-routed period.
   */
  pathDecodes(id, path) {
    const member = this.members.get(id);
    if (!member) return false;
    const tracks = this.pathTracks(id, path);
    const rising = (track) => Boolean(track) && this.counters.get(track.id)?.risen === this.mode?.epoch;
    if (rising(tracks.video)) return true;
    if (!cameraOff(member) && !this.videoHeld(id, path)) return false;
    // Camera off, or video held by the server (Last-N): audio is what
    // arrives; a member that sends nothing at all cannot hold a switch up.
    return rising(tracks.audio) || member.audio_muted;
  }

  /** Whether the server holds member `id`'s video back from us on `path` (Last-N). */
  videoHeld(id, path) {
    return path === 'server' && this.forwardedVideo !== null && !this.forwardedVideo.has(id);
  }

  /** Under Last-N: the members whose video the server forwards to us. */
  onForwardedVideo({ ids }) {
    if (!Array.isArray(ids)) return;
    this.forwardedVideo = new Set(ids.filter((id) => typeof id === 'string'));
    this.record('forwarded_video', { ids: [...this.forwardedVideo] });
    this.kick();
  }

  async sampleStats() {
    const epoch = this.mode?.epoch;
    const pcs = [this.serverLeg?.pc, this.link?.pc].filter((pc) => pc && pc.connectionState !== 'closed');
    const reports = await Promise.all(pcs.map((pc) => pc.getStats().catch(() => null)));
    const linkIndex = pcs.indexOf(this.link?.pc);
    this.directRelayed = linkIndex >= 0 && selectedPairRelayed(reports[linkIndex]);
    const seen = new Set();
    for (const report of reports) {
      if (!report) continue;
      for (const s of report.values()) {
        if (s.type !== 'inbound-rtp' || !s.trackIdentifier) continue;
        const value = s.kind === 'video' ? (s.framesDecoded ?? 0) : (s.packetsReceived ?? 0);
        seen.add(s.trackIdentifier);
        const counter = this.counters.get(s.trackIdentifier);
        if (!counter) {
          this.counters.set(s.trackIdentifier, { value, epoch, risen: null });
          continue;
        }
        if (counter.epoch === epoch && value > counter.value) counter.risen = epoch;
        counter.value = value;
        counter.epoch = epoch;
      }
    }
    for (const id of this.counters.keys()) if (!seen.has(id)) this.counters.delete(id);
  }

  /** Attaches every tile's streams, swaps tiles whose wanted path decodes, reports readiness. */
  reconcile() {
    if (!this.joined || !this.mode) return;
    const now = performance.now();
    for (const id of this.members.keys()) {
      const tile = this.grid.get(id);
      if (!tile) continue;
      for (const path of PATHS) tile.setPathStream(path, this.pathStream(id, path));
      for (const path of PATHS) {
        const key = `${id}/${path}`;
        if (this.pathDecodes(id, path)) {
          if (!this.decodingSince.has(key)) this.decodingSince.set(key, now);
        } else {
          this.decodingSince.delete(key);
        }
      }
      const want = this.wantedPath(id);
      const other = want === 'direct' ? 'server' : 'direct';
      const current = tile.rendered;
      tile.setHeld(this.videoHeld(id, current));
      if (current === want && tile.streams[want]) continue;
      if (!current || !tile.streams[current]) {
        // Nothing (left) on screen: nothing to keep, take what there is.
        if (tile.streams[want]) this.swap(tile, want, 'attach');
        else if (tile.streams[other] && this.pathDecodes(id, other)) this.swap(tile, other, 'fallback');
        else if (current) tile.show(null);
        continue;
      }
      // Make-before-break: swap only once the wanted path decodes (and its
      // <video> has a frame, or had plenty of time to get one; with the
      // camera off the tile shows the avatar and needs no frame).
      const since = this.decodingSince.get(`${id}/${want}`);
      const member = this.members.get(id);
      if (since !== undefined && tile.streams[want]
        && (tile.hasFrame(want) || cameraOff(member) || this.videoHeld(id, want)
          || now - since > SWAP_FRAME_GRACE_MS)) {
        this.swap(tile, want, 'decodes');
      }
    }
    this.maybeReportReady();
  }

  swap(tile, path, reason) {
    const from = tile.rendered;
    tile.show(path);
    this.record('render', { member: tile.id, from, to: path, reason });
  }

  /** Whether the current switch's target path decodes (and is on screen) for everyone it concerns. */
  switchComplete() {
    const mode = this.mode?.mode;
    if (mode === 'to_sfu') {
      for (const id of this.members.keys()) {
        if (!this.pathDecodes(id, 'server') || this.grid.get(id)?.rendered !== 'server') return false;
      }
      return true;
    }
    if (mode === 'to_p2p') {
      const peer = this.mode.peer;
      if (!peer || !this.members.has(peer)) return false;
      return this.pathDecodes(peer, 'direct') && this.grid.get(peer)?.rendered === 'direct';
    }
    return false;
  }

  maybeReportReady() {
    const { epoch } = this.mode;
    if (this.readySent.has(epoch) || !this.switchComplete()) return;
    this.readySent.add(epoch);
    const afterMs = Math.round(performance.now() - this.modeSince);
    this.record('media_ready', { epoch, mode: this.mode.mode, afterMs });
    this.send({ type: 'media_ready', epoch });
    // For the operators' switch-gap histogram: how long from the switch
    // until the new path showed frames from everyone it concerns.
    const to = this.mode.mode === 'to_sfu' ? 'sfu' : 'p2p';
    this.send({ type: 'switch_report', epoch, to, gap_ms: Math.min(afterMs, 60000) });
  }

  /** Whether something waits on fresh stats: a switch in progress, or a tile not on its wanted path. */
  busy() {
    if (!this.mode) return false;
    const switching = this.mode.mode === 'to_sfu' || this.mode.mode === 'to_p2p';
    if (switching && !this.readySent.has(this.mode.epoch)) return true;
    for (const id of this.members.keys()) {
      const tile = this.grid.get(id);
      const want = this.wantedPath(id);
      if (tile && tile.streams[want] && tile.rendered !== want) return true;
    }
    return false;
  }

  /** Re-evaluates soon with fresh stats. */
  kick() {
    if (this.ended || !this.joined) return;
    clearTimeout(this.tickTimer);
    this.tickTimer = setTimeout(() => this.tick(), 0);
  }

  async tick() {
    if (this.ended || this.ticking) return;
    this.ticking = true;
    clearTimeout(this.tickTimer);
    try {
      await this.sampleStats();
      if (this.ended) return;
      this.reconcile();
      this.updatePath();
    } catch (err) {
      console.warn('[confab] stats tick failed', err);
    } finally {
      this.ticking = false;
    }
    if (this.ended) return;
    this.tickTimer = setTimeout(() => this.tick(), this.busy() ? TICK_BUSY_MS : TICK_IDLE_MS);
  }

  // --- local media controls ------------------------------------------------

  toggleMicrophone() {
    if (!this.localStream?.getAudioTracks().length) return;
    this.audioMuted = !this.audioMuted;
    for (const track of this.localStream.getAudioTracks()) track.enabled = !this.audioMuted;
    this.updateControls();
    this.sendMediaState();
  }

  toggleCamera() {
    if (!this.localStream?.getVideoTracks().length) return;
    this.videoMuted = !this.videoMuted;
    for (const track of this.localStream.getVideoTracks()) track.enabled = !this.videoMuted;
    this.updateControls();
    this.sendMediaState();
  }

  /** Shares the screen in place of the camera, or stops sharing. */
  async toggleScreen() {
    if (this.screenTrack) return this.stopScreen();
    if (!this.canShareScreen() || this.pickingScreen) return undefined;
    let stream;
    this.pickingScreen = true;
    try {
      stream = await navigator.mediaDevices.getDisplayMedia({ video: { frameRate: { max: SCREEN_FPS } }, audio: false });
    } catch (err) {
      if (err?.name !== 'NotAllowedError') banner.show('screen_unavailable', `Screen sharing failed (${err?.name ?? 'error'}).`);
      return undefined;
    } finally {
      this.pickingScreen = false;
    }
    const track = stream.getVideoTracks()[0];
    if (!track || this.ended || !this.joined) {
      stream.getTracks().forEach((t) => t.stop());
      return undefined;
    }
    track.contentHint = 'detail'; // keep text sharp rather than motion smooth
    track.addEventListener('ended', () => { if (this.screenTrack === track) this.stopScreen(); });
    this.screenTrack = track;
    this.applyVideoSource();
    return undefined;
  }

  stopScreen() {
    if (!this.screenTrack) return;
    this.screenTrack.stop();
    this.screenTrack = null;
    this.applyVideoSource();
  }

  /** Screen sharing replaces the camera's track, so it needs one (and a browser that can capture). */
  canShareScreen() {
    return Boolean(this.joined && navigator.mediaDevices?.getDisplayMedia && this.localStream?.getVideoTracks().length);
  }

  /** Puts the screen (or the camera) on every video sender and in our own tile, and tells the room. */
  applyVideoSource() {
    const screen = this.screenTrack;
    this.link?.setVideoTrack(screen ?? this.localStream?.getVideoTracks()[0] ?? null);
    this.serverLeg?.setVideoOverride(screen);
    if (this.localStream?.getVideoTracks().length) {
      this.localTile.setPathStream('direct', screen ? new MediaStream([screen]) : this.localStream);
      this.localTile.show('direct');
    }
    this.updateControls();
    this.sendMediaState();
  }

  sendMediaState() {
    if (!this.joined) return;
    this.send({
      type: 'media_state',
      audio_muted: this.audioMuted,
      video_muted: this.videoMuted,
      screen: Boolean(this.screenTrack),
    });
  }

  // --- rendering -----------------------------------------------------------

  updateControls() {
    const hasAudio = Boolean(this.localStream?.getAudioTracks().length);
    const hasVideo = Boolean(this.localStream?.getVideoTracks().length);
    setToggle($('mic-btn'), this.audioMuted, hasAudio, this.audioMuted ? '#icon-mic-off' : '#icon-mic');
    setToggle($('cam-btn'), this.videoMuted, hasVideo, this.videoMuted ? '#icon-cam-off' : '#icon-cam');
    this.localTile?.setMuted({ audio: this.audioMuted, video: this.videoMuted, screen: Boolean(this.screenTrack) });
    const screenBtn = $('screen-btn');
    screenBtn.disabled = !this.screenTrack && !this.canShareScreen();
    screenBtn.setAttribute('aria-pressed', String(Boolean(this.screenTrack)));
    screenBtn.setAttribute('aria-label', this.screenTrack ? 'Stop sharing the screen' : 'Share the screen');
    screenBtn.querySelector('.control-text').textContent = this.screenTrack ? 'Stop sharing' : 'Share screen';
  }

  updateMemberCount() {
    const n = this.members.size + 1;
    $('member-count').textContent = n === 1 ? '1 person' : `${n} people`;
  }

  serverLegUp() {
    return this.serverLegState === 'connected' || this.serverLeg?.pc.connectionState === 'connected';
  }

  /** Which path media takes right now: a key of PATH_LABELS. */
  currentPath() {
    if (this.ended) return 'offline';
    if (!this.joined || !this.mode) return 'joining';
    const { mode, peer } = this.mode;
    if (this.members.size === 0) return 'waiting';
    switch (mode) {
      case 'to_sfu':
      case 'to_p2p':
        return 'switching';
      case 'sfu':
        return this.serverLegUp() ? 'sfu' : 'connecting';
      case 'p2p': {
        if (!peer) return 'waiting';
        const state = this.link?.pc.connectionState;
        if (state === 'connected') return this.directRelayed ? 'relayed' : 'p2p';
        if (state === 'disconnected' || state === 'failed') return 'reconnecting';
        return 'connecting';
      }
      default:
        return 'unsupported';
    }
  }

  updatePath() {
    const path = this.currentPath();
    const badge = $('path-badge');
    if (badge.dataset.path !== path) {
      badge.dataset.path = path;
      $('path-label').textContent = PATH_LABELS[path] ?? path;
    }
    const leg = $('server-leg');
    if (this.joined && this.serverLegState) renderLegState(leg, this.serverLegState);
    else leg.hidden = true;
    if (this.link) this.grid.get(this.link.peerId)?.setConnectionState(this.link.pc.connectionState);
  }

  snapshot() {
    const pcState = (pc) => (pc
      ? { connectionState: pc.connectionState, iceConnectionState: pc.iceConnectionState, signalingState: pc.signalingState }
      : null);
    const trackIds = (id, path) => {
      const t = this.pathTracks(id, path);
      return { audio: t.audio?.id ?? null, video: t.video?.id ?? null };
    };
    const path = this.currentPath();
    return {
      room: this.room,
      name: this.name,
      joined: this.joined,
      /** Automatic rejoins scheduled in this page's life (kept across sessions). */
      reconnects: [...reconnect.history],
      participantId: this.participantId,
      /** Tile ids of the current speakers, dominant first ('local' for this page). */
      speakers: [...this.speakers],
      speakersSource: this.speakersSource,
      /** 'grid' or 'speaker', and the tile speaker view shows large. */
      view: this.grid.view,
      featured: this.grid.featured,
      /** Under Last-N, the members whose video the server forwards to us (null: all). */
      forwardedVideo: this.forwardedVideo ? [...this.forwardedVideo] : null,
      /** The chat panel's messages, oldest first. */
      chat: chat.entries.map((e) => ({ ...e })),
      mode: this.mode ? { ...this.mode } : null,
      epoch: this.mode?.epoch ?? null,
      members: [...this.members.values()].map((m) => {
        const tile = this.grid.get(m.id);
        return {
          ...m,
          rendered: tile?.rendered ?? null,
          wanted: this.mode ? this.wantedPath(m.id) : null,
          videoShown: tile?.el.dataset.video === 'on',
          tracks: { direct: trackIds(m.id, 'direct'), server: trackIds(m.id, 'server') },
          decodes: { direct: this.pathDecodes(m.id, 'direct'), server: this.pathDecodes(m.id, 'server') },
        };
      }),
      path,
      pathLabel: PATH_LABELS[path],
      relayOnly: RELAY_ONLY,
      directRelayed: this.directRelayed,
      connectionState: this.link?.pc.connectionState ?? null,
      iceConnectionState: this.link?.pc.iceConnectionState ?? null,
      signalingState: this.link?.pc.signalingState ?? null,
      direct: this.link ? { peer: this.link.peerId, polite: this.link.polite, ...pcState(this.link.pc) } : null,
      serverLeg: this.serverLeg
        ? {
            state: this.serverLegState,
            sending: this.serverLeg.sending,
            offersAnswered: this.serverLeg.offersAnswered,
            ...pcState(this.serverLeg.pc),
          }
        : null,
      mediaReadySent: [...this.readySent],
      p2pFailedSent: this.p2pFailedSent,
      audioMuted: this.audioMuted,
      videoMuted: this.videoMuted,
      lastError: this.lastError ? { code: this.lastError.code, message: this.lastError.message } : null,
      log: this.log.slice(),
    };
  }
}

function setToggle(button, pressed, enabled, icon) {
  button.setAttribute('aria-pressed', String(pressed));
  button.disabled = !enabled;
  button.querySelector('use').setAttribute('href', icon);
}

// ---------------------------------------------------------------------------
// Chat

/** Most messages kept in the panel. */
const CHAT_MAX_ENTRIES = 500;
/** The server's limit on a message's length (docs/protocol.md). */
const CHAT_MAX_CHARS = 2000;
/** An error this soon after sending a chat message is taken as its refusal. */
const CHAT_REFUSAL_WINDOW_MS = 2000;

/** The chat panel: messages of this session, a recipient choice and an unread count. */
class ChatPanel {
  constructor() {
    this.entries = []; // { from, name, text, private, mine, at, failed? }
    this.lastSent = null; // our latest message: { entry, li, at }
    this.unread = 0;
    this.el = $('chat');
    this.log = $('chat-log');
    this.to = $('chat-to');
    this.text = $('chat-text');
  }

  get open() {
    return !this.el.hidden;
  }

  toggle(open = !this.open) {
    this.el.hidden = !open;
    $('chat-btn').setAttribute('aria-expanded', String(open));
    if (open) {
      this.unread = 0;
      this.text.focus();
    }
    this.showUnread();
  }

  /** A new session: no history (the server keeps none). */
  reset() {
    this.entries = [];
    this.lastSent = null;
    this.unread = 0;
    this.log.replaceChildren();
    this.to.value = '';
    this.setMembers([]);
    this.showUnread();
  }

  /**
   * The recipients offered: everyone, or one member. A private recipient
   * who left stays chosen, marked as gone, so that the next message is not
   * sent to everyone by surprise.
   */
  setMembers(members) {
    const chosen = this.to.value;
    const chosenName = this.to.selectedOptions[0]?.dataset.name ?? '';
    const options = [new Option('Everyone', '')];
    for (const m of members) {
      const option = new Option(`${m.name} (private)`, m.id);
      option.dataset.name = m.name;
      options.push(option);
    }
    if (chosen && !members.some((m) => m.id === chosen)) {
      const gone = new Option(`${chosenName || 'someone'} (left the room)`, chosen);
      gone.dataset.name = chosenName;
      options.push(gone);
    }
    this.to.replaceChildren(...options);
    this.to.value = chosen;
  }

  /** A line from the client itself (not a message). */
  notice(text) {
    const li = document.createElement('li');
    li.className = 'notice';
    li.textContent = text;
    this.log.append(li);
    this.log.scrollTop = this.log.scrollHeight;
  }

  /** The server refused something just sent: if it was our last chat message, mark it undelivered. */
  refused(reason) {
    const last = this.lastSent;
    this.lastSent = null;
    if (!last || performance.now() - last.at > CHAT_REFUSAL_WINDOW_MS) return;
    last.entry.failed = true;
    last.li.dataset.failed = 'true';
    last.li.querySelector('.who').textContent += ' — not delivered';
    last.li.title = reason;
  }

  add(entry) {
    this.entries.push(entry);
    if (this.entries.length > CHAT_MAX_ENTRIES) this.entries.shift();
    const li = document.createElement('li');
    li.dataset.private = String(entry.private);
    li.dataset.mine = String(entry.mine);
    const who = document.createElement('span');
    who.className = 'who';
    who.textContent = entry.mine
      ? (entry.private ? `You → ${entry.toName}` : 'You')
      : (entry.private ? `${entry.name} (to you)` : entry.name);
    const when = document.createElement('time');
    when.className = 'when';
    const date = new Date(entry.at);
    when.dateTime = date.toISOString();
    when.textContent = date.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
    const text = document.createElement('div');
    text.textContent = entry.text; // text, never markup
    li.append(who, when, text);
    this.log.append(li);
    if (entry.mine) this.lastSent = { entry, li, at: performance.now() };
    while (this.log.children.length > CHAT_MAX_ENTRIES) this.log.firstElementChild.remove();
    this.log.scrollTop = this.log.scrollHeight;
    if (!entry.mine && !this.open) {
      this.unread += 1;
      this.showUnread();
      announce(`Message from ${entry.name}`);
    }
  }

  showUnread() {
    const badge = $('chat-unread');
    badge.hidden = this.unread === 0;
    badge.textContent = this.unread > 99 ? '99+' : String(this.unread);
    $('chat-btn').setAttribute('aria-label', this.unread ? `Chat, ${this.unread} unread` : 'Chat');
  }
}

// ---------------------------------------------------------------------------
// App wiring

const grid = new TileGrid($('grid'));
const chat = new ChatPanel();

/** Grid or speaker view, remembered across visits. */
function setView(view) {
  grid.setView(view);
  const speaker = grid.view === 'speaker';
  $('view-btn').setAttribute('aria-pressed', String(speaker));
  $('view-btn').querySelector('span').textContent = speaker ? 'Grid view' : 'Speaker view';
  try { localStorage.setItem('confab.view', grid.view); } catch { /* storage may be unavailable */ }
}
setView((() => { try { return localStorage.getItem('confab.view'); } catch { return null; } })());

let session = null;

/** Errors after which the client rejoins by itself (see onSocketClosed). */
const RETRYABLE_ERRORS = new Set(['server_shutdown', 'draining', 'too_many_joins', 'too_many_rooms', 'join_timeout']);
const RECONNECT_ATTEMPTS = 6;
const RECONNECT_BASE_MS = 1000;
const RECONNECT_MAX_MS = 15_000;
/** Automatic rejoins since the last successful join. */
const reconnect = { attempts: 0, timer: null, history: [] };

function startSession(params) {
  clearTimeout(reconnect.timer);
  banner.hide();
  session = new Session(params);
  session.start().catch((err) => {
    console.error(err);
    banner.show('client_error', String(err?.message ?? err));
  });
}

function showEnded(title, detail) {
  $('ended-title').textContent = title;
  $('ended-detail').textContent = detail;
  showView('ended');
  $('ended-title').focus();
}

function showJoinForm({ room, name }) {
  $('join-room').value = room;
  $('join-name').value = name || localStorage.getItem('confab.name') || '';
  showView('join');
  (room ? $('join-name') : $('join-room')).focus();
}

$('join-form').addEventListener('submit', (e) => {
  e.preventDefault();
  const room = $('join-room').value.trim();
  const name = $('join-name').value.trim();
  const error = !ROOM_PATTERN.test(room)
    ? 'Room names use 1-64 letters, digits, “_”, “-” or “.”.'
    : !name || name.length > 64 ? 'Enter a name of 1-64 characters.' : '';
  $('join-error').textContent = error;
  $('join-error').hidden = !error;
  if (error) return;
  try { localStorage.setItem('confab.name', name); } catch { /* storage may be unavailable */ }
  const { token } = readJoinParams();
  const params = new URLSearchParams({ room, name });
  if (token) params.set('token', token);
  if (RELAY_ONLY) params.set('relay', '1');
  history.pushState(null, '', `/?${params}`);
  startSession({ room, name, token });
});

$('mic-btn').addEventListener('click', () => session?.toggleMicrophone());
$('screen-btn').addEventListener('click', () => session?.toggleScreen());
$('chat-btn').addEventListener('click', () => chat.toggle());
$('view-btn').addEventListener('click', () => setView(grid.view === 'speaker' ? 'grid' : 'speaker'));
$('chat-close').addEventListener('click', () => chat.toggle(false));
$('chat-form').addEventListener('submit', (e) => {
  e.preventDefault();
  if (session?.sendChat(chat.text.value, chat.to.value || null)) chat.text.value = '';
});
$('chat-text').addEventListener('keydown', (e) => {
  if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    $('chat-form').requestSubmit();
  }
});
$('cam-btn').addEventListener('click', () => session?.toggleCamera());
$('leave-btn').addEventListener('click', () => session?.leave());
$('rejoin-btn').addEventListener('click', () => {
  const params = readJoinParams();
  if (params.room && params.name) startSession(params);
  else showJoinForm(params);
});
$('copy-link').addEventListener('click', async () => {
  const link = `${location.origin}/?room=${encodeURIComponent(session?.room ?? '')}`;
  try {
    await navigator.clipboard.writeText(link);
    announce('Link copied');
    $('copy-link').querySelector('span').textContent = 'Copied';
    setTimeout(() => { $('copy-link').querySelector('span').textContent = 'Invite'; }, 2000);
  } catch {
    window.prompt('Copy this link to invite others:', link);
  }
});
window.addEventListener('popstate', () => location.reload());

// Read-only debug hooks, used by the browser tests.
window.confab = Object.freeze({
  /** The direct leg's RTCPeerConnection, or null. */
  pc: () => session?.link?.pc ?? null,
  /** The server leg's RTCPeerConnection, or null before `joined`. */
  serverPc: () => session?.serverLeg?.pc ?? null,
  /** A snapshot of the client's state (mode, members, which path each tile renders, …). */
  state: () => session?.snapshot() ?? null,
});

const initial = readJoinParams();
if (initial.room && initial.name) startSession(initial);
else showJoinForm(initial);
