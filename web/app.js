// Confab browser client.
//
// Speaks the Confab signaling protocol, version 1 (docs/protocol.md): JSON
// text frames over one WebSocket at /ws. In `p2p` mode the two members of a
// room connect directly with one RTCPeerConnection, negotiated with the
// perfect-negotiation pattern; the server says who is polite.

const PROTOCOL_VERSION = 1;
const PING_INTERVAL_MS = 10_000;
/** How long ICE may stay `disconnected` before the impolite side restarts it. */
const ICE_DISCONNECTED_GRACE_MS = 4_000;
/** Signals from a peer we have no connection for yet are kept (bounded) until its `mode` arrives. */
const MAX_PENDING_SIGNALS = 200;

/**
 * Labels of the media-path badge. `sfu` and `switching` belong to a later
 * protocol version (server-routed media); the badge already knows them.
 */
const PATH_LABELS = Object.freeze({
  joining: 'joining…',
  waiting: 'waiting for others',
  connecting: 'connecting…',
  reconnecting: 'reconnecting…',
  p2p: 'peer-to-peer',
  sfu: 'via server',
  switching: 'switching…',
  unsupported: 'unsupported mode',
  offline: 'not connected',
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

// ---------------------------------------------------------------------------
// Video grid

/** One participant's tile: video (or avatar), name, mute indicators, connection state. */
class Tile {
  constructor({ id, name, local = false }) {
    this.id = id;
    this.local = local;
    this.el = $('tile-template').content.firstElementChild.cloneNode(true);
    this.el.dataset.id = id;
    this.el.classList.toggle('local', local);
    this.video = this.el.querySelector('video');
    this.video.muted = local; // never play our own microphone back
    this.unmuteButton = this.el.querySelector('.unmute-audio');
    this.unmuteButton.addEventListener('click', () => {
      this.video.muted = false;
      this.unmuteButton.hidden = true;
      this.video.play().catch(() => {});
    });
    this.setName(name);
    this.setMuted({ audio: false, video: false });
    this.setStream(null);
  }

  setName(name) {
    this.name = name;
    this.el.querySelector('.name').textContent = this.local ? `${name} (you)` : name;
    this.el.querySelector('.avatar').textContent = initials(name);
    this.video.setAttribute('aria-label', this.local ? 'Your camera preview' : `Video of ${name}`);
  }

  setMuted({ audio, video }) {
    this.el.querySelector('.mic-off').hidden = !audio;
    this.el.querySelector('.cam-off').hidden = !video;
    this.el.dataset.cameraOff = String(Boolean(video));
  }

  setStream(stream) {
    if (this.video.srcObject === stream) return;
    this.video.srcObject = stream;
    this.el.dataset.video = stream ? 'on' : 'off';
    if (!stream) return;
    this.video.play().catch((err) => {
      if (err?.name !== 'NotAllowedError' || this.local) return;
      // Autoplay with sound refused: play muted and let the user turn sound on.
      this.video.muted = true;
      this.unmuteButton.hidden = false;
      this.video.play().catch(() => {});
    });
  }

  /** The RTCPeerConnection state towards this participant, or null to hide it. */
  setConnectionState(state) {
    const el = this.el.querySelector('.conn-state');
    el.hidden = !state;
    el.textContent = state ?? '';
    if (state) this.el.dataset.conn = state;
    else delete this.el.dataset.conn;
  }

  remove() {
    this.video.srcObject = null;
    this.el.remove();
  }
}

/** Lays tiles out in a grid whose column count gives the largest 16:9 tiles. */
class TileGrid {
  constructor(el) {
    this.el = el;
    this.tiles = new Map();
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

  layout() {
    const n = Math.max(1, this.tiles.size);
    const style = getComputedStyle(this.el);
    const gap = parseFloat(style.columnGap) || 0;
    const width = this.el.clientWidth - (parseFloat(style.paddingLeft) || 0) - (parseFloat(style.paddingRight) || 0);
    const height = this.el.clientHeight - (parseFloat(style.paddingTop) || 0) - (parseFloat(style.paddingBottom) || 0);
    if (width <= 0 || height <= 0) return;
    let best = { cols: 1, w: 0 };
    for (let cols = 1; cols <= n; cols++) {
      const rows = Math.ceil(n / cols);
      const cellW = (width - gap * (cols - 1)) / cols;
      const cellH = (height - gap * (rows - 1)) / rows;
      const w = Math.min(cellW, (cellH * 16) / 9);
      if (w > best.w) best = { cols, w };
    }
    const tileW = Math.max(0, Math.floor(best.w));
    this.el.style.setProperty('--cols', String(best.cols));
    this.el.style.setProperty('--tile-w', `${tileW}px`);
    this.el.style.setProperty('--tile-h', `${Math.floor((tileW * 9) / 16)}px`);
    this.el.dataset.count = String(this.tiles.size);
  }
}

// ---------------------------------------------------------------------------
// Peer-to-peer link: one RTCPeerConnection to one peer, perfect negotiation.

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
   */
  constructor({ peerId, polite, iceServers, localStream, signal, onRemoteStream, onStateChange }) {
    this.peerId = peerId;
    this.polite = polite;
    this.signal = signal;
    this.onRemoteStream = onRemoteStream;
    this.onStateChange = onStateChange;
    this.makingOffer = false;
    this.ignoreOffer = false;
    this.settingRemoteAnswer = false;
    this.closed = false;
    this.disconnectedTimer = null;
    this.remoteStream = null;

    const pc = new RTCPeerConnection({ iceServers });
    this.pc = pc;
    pc.addEventListener('negotiationneeded', () => this.negotiate());
    pc.addEventListener('icecandidate', (e) => this.sendCandidate(e.candidate));
    pc.addEventListener('track', (e) => this.onTrack(e));
    pc.addEventListener('connectionstatechange', () => this.onStateChange());
    pc.addEventListener('iceconnectionstatechange', () => this.onIceStateChange());

    const kinds = new Set();
    for (const track of localStream?.getTracks() ?? []) {
      pc.addTrack(track, localStream);
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
    this.onRemoteStream(stream);
  }

  onIceStateChange() {
    const state = this.pc.iceConnectionState;
    clearTimeout(this.disconnectedTimer);
    this.disconnectedTimer = null;
    if (state === 'failed') {
      this.restartIce('failed');
    } else if (state === 'disconnected') {
      this.disconnectedTimer = setTimeout(() => {
        if (!this.closed && this.pc.iceConnectionState === 'disconnected') this.restartIce('disconnected');
      }, ICE_DISCONNECTED_GRACE_MS);
    }
    this.onStateChange();
  }

  /** The impolite side restarts ICE; the polite side waits for its offer. */
  restartIce(reason) {
    if (this.closed) return;
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
    this.members = new Map(); // id → { id, name, audio_muted, video_muted }
    this.iceServers = [];
    this.mode = null; // { mode, peer, polite, epoch }
    this.link = null; // PeerLink while in p2p mode with a peer
    this.pendingSignals = [];
    this.localStream = null;
    this.audioMuted = false;
    this.videoMuted = false;
    this.pingTimer = null;
    this.ended = false;
    this.leaving = false;
    this.lastError = null;
    this.grid = grid;
    this.localTile = null;
  }

  // --- lifecycle -----------------------------------------------------------

  async start() {
    showView('call');
    $('room-name').textContent = this.room;
    document.title = `${this.room} · Confab`;
    this.grid.clear();
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
    this.localTile.setStream(stream?.getVideoTracks().length ? stream : null);
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
    showEnded('Disconnected', reason);
  }

  teardown() {
    this.ended = true;
    this.joined = false;
    clearInterval(this.pingTimer);
    this.closeLink();
    this.localStream?.getTracks().forEach((t) => t.stop());
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
    this.participantId = msg.participant_id;
    this.iceServers = iceServersFromWire(msg.ice_servers);
    for (const member of msg.members ?? []) this.addMember(member);
    this.pingTimer = setInterval(() => this.send({ type: 'ping' }), PING_INTERVAL_MS);
    if (this.audioMuted || this.videoMuted) this.sendMediaState();
    if (msg.mode) this.applyMode(msg.mode);
    this.updatePath();
  }

  onParticipantJoined(participant) {
    if (!participant?.id) return;
    this.addMember(participant);
    announce(`${participant.name} joined`);
  }

  onParticipantLeft({ id }) {
    const member = this.members.get(id);
    this.members.delete(id);
    if (this.link?.peerId === id) this.closeLink();
    this.grid.remove(id);
    this.updateMemberCount();
    if (member) announce(`${member.name} left`);
  }

  onParticipantUpdated(msg) {
    const member = this.members.get(msg.id);
    if (!member) return;
    if (typeof msg.audio_muted === 'boolean') member.audio_muted = msg.audio_muted;
    if (typeof msg.video_muted === 'boolean') member.video_muted = msg.video_muted;
    this.grid.get(msg.id)?.setMuted({ audio: member.audio_muted, video: member.video_muted });
  }

  onError({ code, message }) {
    this.lastError = { code: String(code ?? 'error'), message: message ?? '', at: performance.now() };
    console.warn('[confab] server error', code, message);
    banner.show(this.lastError.code, this.lastError.message);
  }

  addMember(raw) {
    const member = {
      id: raw.id,
      name: raw.name ?? raw.id,
      audio_muted: Boolean(raw.audio_muted),
      video_muted: Boolean(raw.video_muted),
    };
    this.members.set(member.id, member);
    const tile = this.grid.get(member.id) ?? this.grid.add(new Tile({ id: member.id, name: member.name }));
    tile.setName(member.name);
    tile.setMuted({ audio: member.audio_muted, video: member.video_muted });
    this.updateMemberCount();
  }

  /** `mode` (also embedded in `joined`). */
  applyMode(msg) {
    if (this.mode && typeof msg.epoch === 'number' && msg.epoch < this.mode.epoch) return; // stale
    this.mode = {
      mode: msg.mode,
      peer: msg.peer ?? null,
      polite: Boolean(msg.polite),
      epoch: msg.epoch,
    };
    if (this.mode.mode === 'p2p') {
      this.enterPeerToPeer(this.mode);
    } else {
      // Not a mode of protocol version 1.
      this.closeLink();
      console.warn('[confab] unsupported media mode', this.mode.mode);
    }
    this.updatePath();
  }

  enterPeerToPeer({ peer, polite }) {
    if (this.link && this.link.peerId === peer) {
      this.link.polite = polite;
      return;
    }
    this.closeLink();
    if (!peer) return;

    this.grid.get(peer) ?? this.grid.add(new Tile({ id: peer, name: this.members.get(peer)?.name ?? '…' }));
    this.link = new PeerLink({
      peerId: peer,
      polite,
      iceServers: this.iceServers,
      localStream: this.localStream,
      signal: (msg) => this.send({ ...msg, to: peer }),
      onRemoteStream: (stream) => this.grid.get(peer)?.setStream(stream),
      onStateChange: () => this.updatePath(),
    });
    // Replay anything the peer sent before we knew it was our peer.
    const pending = this.pendingSignals;
    this.pendingSignals = [];
    for (const msg of pending) if (msg.from === peer) this.onSignal(msg);
  }

  /** Closes the peer connection and takes the old peer's media off screen. */
  closeLink() {
    const link = this.link;
    this.pendingSignals = [];
    if (!link) return;
    this.link = null;
    link.close();
    if (this.members.has(link.peerId)) {
      const tile = this.grid.get(link.peerId);
      tile?.setStream(null);
      tile?.setConnectionState(null);
    } else {
      this.grid.remove(link.peerId);
    }
    this.updatePath();
  }

  onSignal(msg) {
    const link = this.link;
    if (!link || link.peerId !== msg.from) {
      if (this.pendingSignals.length < MAX_PENDING_SIGNALS) this.pendingSignals.push(msg);
      return;
    }
    if (msg.type === 'candidate') {
      link.handleCandidate(msg.candidate);
    } else if (typeof msg.sdp === 'string') {
      link.handleDescription({ type: msg.type, sdp: msg.sdp });
    }
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

  sendMediaState() {
    if (!this.joined) return;
    this.send({ type: 'media_state', audio_muted: this.audioMuted, video_muted: this.videoMuted });
  }

  // --- rendering -----------------------------------------------------------

  updateControls() {
    const hasAudio = Boolean(this.localStream?.getAudioTracks().length);
    const hasVideo = Boolean(this.localStream?.getVideoTracks().length);
    setToggle($('mic-btn'), this.audioMuted, hasAudio, this.audioMuted ? '#icon-mic-off' : '#icon-mic');
    setToggle($('cam-btn'), this.videoMuted, hasVideo, this.videoMuted ? '#icon-cam-off' : '#icon-cam');
    this.localTile?.setMuted({ audio: this.audioMuted, video: this.videoMuted });
  }

  updateMemberCount() {
    const n = this.members.size + 1;
    $('member-count').textContent = n === 1 ? '1 person' : `${n} people`;
  }

  /** Which path media takes right now: a key of PATH_LABELS. */
  currentPath() {
    if (this.ended) return 'offline';
    if (!this.joined || !this.mode) return 'joining';
    if (this.mode.mode !== 'p2p') return 'unsupported';
    if (!this.mode.peer) return 'waiting';
    const state = this.link?.pc.connectionState;
    if (state === 'connected') return 'p2p';
    if (state === 'disconnected' || state === 'failed') return 'reconnecting';
    return 'connecting';
  }

  updatePath() {
    const path = this.currentPath();
    const badge = $('path-badge');
    if (badge.dataset.path !== path) {
      badge.dataset.path = path;
      $('path-label').textContent = PATH_LABELS[path] ?? path;
    }
    if (this.link) this.grid.get(this.link.peerId)?.setConnectionState(this.link.pc.connectionState);
  }

  snapshot() {
    return {
      room: this.room,
      name: this.name,
      joined: this.joined,
      participantId: this.participantId,
      mode: this.mode ? { ...this.mode } : null,
      members: [...this.members.values()].map((m) => ({ ...m })),
      path: this.currentPath(),
      pathLabel: PATH_LABELS[this.currentPath()],
      connectionState: this.link?.pc.connectionState ?? null,
      iceConnectionState: this.link?.pc.iceConnectionState ?? null,
      signalingState: this.link?.pc.signalingState ?? null,
      audioMuted: this.audioMuted,
      videoMuted: this.videoMuted,
      lastError: this.lastError ? { code: this.lastError.code, message: this.lastError.message } : null,
    };
  }
}

function setToggle(button, pressed, enabled, icon) {
  button.setAttribute('aria-pressed', String(pressed));
  button.disabled = !enabled;
  button.querySelector('use').setAttribute('href', icon);
}

// ---------------------------------------------------------------------------
// App wiring

const grid = new TileGrid($('grid'));
let session = null;

function startSession(params) {
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
  history.pushState(null, '', `/?${params}`);
  startSession({ room, name, token });
});

$('mic-btn').addEventListener('click', () => session?.toggleMicrophone());
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
  pc: () => session?.link?.pc ?? null,
  state: () => session?.snapshot() ?? null,
});

const initial = readJoinParams();
if (initial.room && initial.name) startSession(initial);
else showJoinForm(initial);
