'use strict';

(() => {
  const ICE_GATHER_TIMEOUT_MS = 3000;
  const PROMPT_DEBOUNCE_MS = 400;
  const POLL_INTERVAL_MS = 1000;

  const $ = (id) => document.getElementById(id);
  const el = {
    start: $('start'), stop: $('stop'), mode: $('mode'), prompt: $('prompt'),
    seed: $('seed'), strength: $('strength'), strengthValue: $('strength-value'),
    cut: $('cut'), video: $('video'), status: $('status'), epoch: $('epoch'),
    ack: $('ack'), sessionId: $('session-id'),
    fpsOut: $('fps-out'), ttff: $('ttff'), p50: $('latency-p50'), p95: $('latency-p95'),
    chunksOut: $('chunks-out'), dropped: $('frames-dropped'),
    framesDecoded: $('frames-decoded'), fpsBrowser: $('fps-browser'), videoTime: $('video-time'),
  };

  // All mutable session state lives here.
  const s = {
    pc: null, dc: null, sessionId: null, stream: null,
    generation: 0,        // bumped on every start/stop so stale async steps bail out
    pollTimer: null, promptTimer: null, lastPrompt: null, lastDecode: null,
  };

  // Live view for tests: window.demo.pc etc. always reflect the current session.
  window.demo = Object.freeze({
    get pc() { return s.pc; },
    get dc() { return s.dc; },
    get sessionId() { return s.sessionId; },
  });

  // ---------- UI helpers ----------

  function setState(state, text) {
    document.body.dataset.state = state;
    el.status.textContent = text;
    const active = state === 'connecting' || state === 'connected';
    el.start.disabled = active;
    el.stop.disabled = !active;
    el.mode.disabled = active;
    el.cut.disabled = state !== 'connected';
  }

  const fmt = (v, digits = 0, unit = '') =>
    (typeof v === 'number' && Number.isFinite(v)) ? v.toFixed(digits) + unit : '–';

  function showReply(text, isError) {
    el.ack.textContent = text;
    el.ack.classList.toggle('error', Boolean(isError));
  }

  function resetStats() {
    for (const key of ['fpsOut', 'ttff', 'p50', 'p95', 'chunksOut', 'dropped',
      'framesDecoded', 'fpsBrowser', 'videoTime', 'sessionId', 'epoch']) {
      el[key].textContent = '–';
    }
    showReply('–', false);
  }

  // ---------- Control channel ----------

  function sendControl(msg) {
    if (!s.dc || s.dc.readyState !== 'open') return false;
    s.dc.send(JSON.stringify(msg));
    return true;
  }

  function sendPrompt(force) {
    clearTimeout(s.promptTimer);
    const prompt = el.prompt.value.trim();
    if (!prompt || (!force && prompt === s.lastPrompt)) return;
    if (sendControl({ type: 'prompt', prompt })) s.lastPrompt = prompt;
  }

  function onControlMessage(event) {
    let msg;
    try { msg = JSON.parse(event.data); } catch { return; }
    if (typeof msg.epoch === 'number') el.epoch.textContent = String(msg.epoch);
    if (msg.type === 'ack') {
      const { type, epoch, ...rest } = msg;
      const detail = Object.keys(rest).length ? ' ' + JSON.stringify(rest) : '';
      showReply(`ack · epoch ${fmt(epoch)}${detail}`, false);
    } else if (msg.type === 'error') {
      showReply(`error · ${msg.message || 'unknown error'}`, true);
    }
    // 'stats' pushes only carry the epoch for now; /api/metrics drives the numbers.
  }

  function wireControlChannel(dc, gen) {
    dc.onopen = () => markConnectedIfReady(gen);
    dc.onmessage = onControlMessage;
    dc.onclose = () => {
      if (gen === s.generation) fail('Control channel closed by the server');
    };
  }

  // ---------- Connection lifecycle ----------

  function markConnectedIfReady(gen) {
    if (gen !== s.generation || !s.pc) return;
    if (s.pc.connectionState === 'connected' && s.dc && s.dc.readyState === 'open') {
      setState('connected', `Connected · session ${s.sessionId || '?'}`);
    }
  }

  function waitForIceGathering(pc, timeoutMs) {
    if (pc.iceGatheringState === 'complete') return Promise.resolve();
    return new Promise((resolve) => {
      const done = () => {
        clearTimeout(timer);
        pc.removeEventListener('icegatheringstatechange', check);
        resolve();
      };
      const check = () => { if (pc.iceGatheringState === 'complete') done(); };
      const timer = setTimeout(done, timeoutMs);
      pc.addEventListener('icegatheringstatechange', check);
    });
  }

  async function getWebcam() {
    if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      throw new Error('Webcam unavailable (needs HTTPS or localhost)');
    }
    try {
      return await navigator.mediaDevices.getUserMedia({ video: true, audio: false });
    } catch (err) {
      const reasons = {
        NotAllowedError: 'Camera permission was denied',
        NotFoundError: 'No camera found',
        NotReadableError: 'Camera is in use by another application',
      };
      throw new Error(reasons[err.name] || `Webcam error: ${err.message || err.name}`);
    }
  }

  async function postOffer(body) {
    let res;
    try {
      res = await fetch('/api/offer', {
        method: 'POST',
        headers: { 'Content-Type': 'application/json' },
        body: JSON.stringify(body),
      });
    } catch (err) {
      throw new Error(`Server unreachable: ${err.message}`);
    }
    const data = await res.json().catch(() => ({}));
    if (!res.ok) {
      const prefix = res.status === 503 ? 'Server busy' : `Server error ${res.status}`;
      throw new Error(`${prefix}: ${data.error || res.statusText || 'no details'}`);
    }
    return data;
  }

  // Range inputs can yield values like 0.35000000000000003; keep two decimals.
  const strengthValue = () => Math.round(parseFloat(el.strength.value) * 100) / 100;

  function currentParams() {
    const seed = parseInt(el.seed.value, 10);
    return {
      prompt: el.prompt.value.trim(),
      seed: Number.isFinite(seed) ? seed : 0,
      strength: strengthValue(),
    };
  }

  async function start() {
    teardown();
    const gen = ++s.generation;
    const mode = el.mode.value;
    resetStats();
    setState('connecting', mode === 'v2v' ? 'Requesting webcam…' : 'Connecting…');
    try {
      if (mode === 'v2v') {
        const stream = await getWebcam();
        if (gen !== s.generation) { stream.getTracks().forEach((t) => t.stop()); return; }
        s.stream = stream;
      }

      const pc = new RTCPeerConnection({ iceServers: [] }); // never contact outside STUN
      s.pc = pc;
      s.dc = pc.createDataChannel('control'); // must exist before createOffer
      wireControlChannel(s.dc, gen);
      if (mode === 'v2v') {
        pc.addTransceiver(s.stream.getVideoTracks()[0], { direction: 'sendrecv', streams: [s.stream] });
      } else {
        pc.addTransceiver('video', { direction: 'recvonly' });
      }
      pc.ontrack = (ev) => {
        el.video.srcObject = ev.streams[0] || new MediaStream([ev.track]);
        el.video.play().catch(() => {}); // muted autoplay; ignore policy rejections
      };
      pc.onconnectionstatechange = () => onConnectionState(pc, gen);

      setState('connecting', 'Gathering network candidates…');
      await pc.setLocalDescription(await pc.createOffer());
      await waitForIceGathering(pc, ICE_GATHER_TIMEOUT_MS);
      if (gen !== s.generation) return;

      setState('connecting', 'Negotiating with server…');
      const params = currentParams();
      s.lastPrompt = params.prompt; // the offer carries the initial prompt
      const answer = await postOffer({
        sdp: pc.localDescription.sdp, type: pc.localDescription.type, params, mode,
      });
      if (gen !== s.generation) return;
      s.sessionId = answer.session_id || null;
      el.sessionId.textContent = s.sessionId || '–';
      await pc.setRemoteDescription({ type: answer.type, sdp: answer.sdp });
      s.pollTimer = setInterval(poll, POLL_INTERVAL_MS);
      markConnectedIfReady(gen);
    } catch (err) {
      if (gen === s.generation) fail(err.message || String(err));
    }
  }

  function onConnectionState(pc, gen) {
    if (gen !== s.generation) return;
    const state = pc.connectionState;
    if (state === 'connected') markConnectedIfReady(gen);
    else if (state === 'failed') fail('Connection failed (ICE/DTLS)');
    else if (state === 'disconnected') el.status.textContent = 'Connection interrupted, waiting…';
  }

  // Close everything belonging to the current session (does not touch the status line).
  function teardown() {
    s.generation++;
    clearInterval(s.pollTimer);
    clearTimeout(s.promptTimer);
    if (s.dc) { s.dc.onclose = null; s.dc.close(); }
    if (s.pc) s.pc.close();
    if (s.stream) s.stream.getTracks().forEach((t) => t.stop());
    el.video.srcObject = null;
    Object.assign(s, { pc: null, dc: null, sessionId: null, stream: null, pollTimer: null, lastDecode: null });
  }

  function stop() {
    teardown();
    resetStats();
    setState('idle', 'Idle');
  }

  function fail(message) {
    teardown();
    setState('error', `Error: ${message}`);
  }

  // ---------- Stats polling ----------

  async function poll() {
    const gen = s.generation;
    await Promise.allSettled([pollServerMetrics(gen), pollBrowserStats(gen)]);
  }

  async function pollServerMetrics(gen) {
    if (!s.sessionId) return;
    const res = await fetch('/api/metrics', { cache: 'no-store' });
    if (!res.ok || gen !== s.generation) return;
    const m = ((await res.json()).sessions || {})[s.sessionId];
    if (!m || gen !== s.generation) return;
    const lat = m.latency_ms || {};
    el.fpsOut.textContent = fmt(m.fps_out, 1);
    el.ttff.textContent = fmt(m.ttff_ms, 0, ' ms');
    el.p50.textContent = fmt(lat.p50, 0, ' ms');
    el.p95.textContent = fmt(lat.p95, 0, ' ms');
    el.chunksOut.textContent = fmt(m.chunks_out);
    el.dropped.textContent = fmt(m.frames_dropped);
    if (typeof m.epoch === 'number') el.epoch.textContent = String(m.epoch);
  }

  async function pollBrowserStats(gen) {
    if (!s.pc) return;
    const report = await s.pc.getStats();
    if (gen !== s.generation) return;
    report.forEach((r) => {
      if (r.type !== 'inbound-rtp' || (r.kind || r.mediaType) !== 'video') return;
      const decoded = r.framesDecoded || 0;
      let fps = r.framesPerSecond;
      if (typeof fps !== 'number' && s.lastDecode) { // Firefox: derive from deltas
        fps = (decoded - s.lastDecode.frames) / ((r.timestamp - s.lastDecode.ts) / 1000);
      }
      s.lastDecode = { frames: decoded, ts: r.timestamp };
      el.framesDecoded.textContent = String(decoded);
      el.fpsBrowser.textContent = fmt(fps, 1);
    });
    el.videoTime.textContent = fmt(el.video.currentTime, 1, ' s');
  }

  // ---------- Control wiring ----------

  el.start.addEventListener('click', start);
  el.stop.addEventListener('click', stop);
  el.cut.addEventListener('click', () => sendControl({ type: 'cut' }));

  el.prompt.addEventListener('keydown', (ev) => {
    if (ev.key === 'Enter' && !ev.shiftKey && !ev.isComposing) {
      ev.preventDefault();
      sendPrompt(true);
    }
  });
  el.prompt.addEventListener('input', () => {
    clearTimeout(s.promptTimer);
    if (document.body.dataset.state === 'connected') {
      s.promptTimer = setTimeout(() => sendPrompt(false), PROMPT_DEBOUNCE_MS);
    }
  });

  el.seed.addEventListener('change', () => {
    const seed = parseInt(el.seed.value, 10);
    if (Number.isFinite(seed)) sendControl({ type: 'params', seed });
  });
  el.strength.addEventListener('input', () => {
    el.strengthValue.textContent = strengthValue().toFixed(2);
  });
  el.strength.addEventListener('change', () => {
    sendControl({ type: 'params', strength: strengthValue() });
  });

  // A model with a closed vocabulary (the demo) says which words it knows: show them under the prompt.
  fetch('/api/health').then((res) => res.json()).then((health) => {
    if (!Array.isArray(health.words)) return;
    const words = document.getElementById('words');
    words.textContent = `The ${health.model} model knows these words: ${health.words.join(', ')}. `
      + 'It keeps drawing the objects it has drawn: after a new prompt, Hard cut starts its scene.';
    words.hidden = false;
  }).catch(() => {}).finally(() => { document.body.dataset.health = 'read'; });

  window.addEventListener('beforeunload', teardown);
  setState('idle', 'Idle');
})();
