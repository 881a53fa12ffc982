// The demo SIP phone: JsSIP (served SRI-protected from /vendor/jssip.min.js) over a WebSocket to
// Kamailio behind Envoy's /ws/sip (wss:// on the HTTPS listener only). No SIP password exists:
// the dev login issues a 5-minute token whose `sip_identity` jwt-auth verifies and hands to
// Kamailio as x-gatehouse-sip-identity; Kamailio accepts requests only From that identity.
// Tokens live in this closure only (never in localStorage / sessionStorage or on `window`).
// Media is relayed by coturn with ephemeral credentials from /turn-credentials
// (iceTransportPolicy "relay").
"use strict";

(() => {
  const DOMAIN = "gatehouse.local";
  const $ = (id) => document.getElementById(id);
  let ext = null;
  let token = null;
  let iceServers = [];
  let ua = null;
  let socket = null; // the GatehouseSocket JsSIP talks through
  let session = null;
  let refresher = null;

  function log(text, cls) {
    const li = document.createElement("li");
    // textContent, never innerHTML: whatever a peer sends is shown, not run.
    li.textContent = new Date().toISOString().slice(11, 19) + " [sip] " + text;
    if (cls) li.className = cls;
    $("log").prepend(li);
  }

  function status(text) {
    $("phone-status").textContent = text;
    log(text);
  }

  // A fresh 5-minute token for this extension, in this browser's session (__Host-gh-sid).
  async function login() {
    const r = await fetch("/dev/login", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ user: ext }),
    });
    if (!r.ok) { log("login failed: HTTP " + r.status, "close"); return null; }
    const body = await r.json();
    token = body.access_token;
    $("phone-expiry").textContent = new Date(Date.now() + body.expires_in * 1000).toLocaleTimeString();
    return body;
  }

  // JsSIP's socket interface over a WebSocket whose connect token rides in Sec-WebSocket-Protocol
  // (never in the URL). Connect tokens are single-use: every connect takes a fresh one.
  class GatehouseSocket {
    constructor(url) {
      this.url = url;
      this.via_transport = url.startsWith("wss:") ? "WSS" : "WS";
      this.sip_uri = "sip:" + location.hostname + ";transport=ws";
      this.ws = null;
      this.onconnect = this.ondisconnect = this.ondata = () => {};
    }
    connect() {
      login().then((body) => {
        if (!body) { this.ondisconnect(true, 4401, "login failed"); return; }
        const ws = new WebSocket(this.url, ["sip", "bearer." + token]);
        this.ws = ws;
        ws.onopen = () => { log("signaling socket open (" + this.url + ")"); this.onconnect(); };
        ws.onclose = (e) => {
          log("signaling socket closed: code " + e.code + (e.reason ? " (" + e.reason + ")" : ""), "close");
          $("phone-close").textContent = String(e.code);
          if (this.ws === ws) this.ws = null;
          this.ondisconnect(!e.wasClean, e.code, e.reason);
        };
        ws.onmessage = (e) => this.ondata(e.data);
      });
    }
    disconnect() { if (this.ws) this.ws.close(1000); }
    send(data) {
      if (!this.ws || this.ws.readyState !== WebSocket.OPEN) return false;
      this.ws.send(data);
      return true;
    }
    isConnected() { return !!this.ws && this.ws.readyState === WebSocket.OPEN; }
    isConnecting() { return !!this.ws && this.ws.readyState === WebSocket.CONNECTING; }
    // In-band re-auth: jwt-auth verifies the fresh token and extends this socket; it never
    // reaches Kamailio.
    reauth() {
      if (!this.isConnected()) return false;
      this.ws.send(JSON.stringify({ type: "gatehouse.reauth", token }));
      return true;
    }
  }

  async function turnCredentials() {
    const r = await fetch("/turn-credentials", { method: "POST", headers: { authorization: "Bearer " + token } });
    if (!r.ok) { log("TURN credentials: HTTP " + r.status, "close"); return false; }
    const creds = await r.json();
    iceServers = creds.iceServers;
    log("TURN credentials for " + iceServers[0].username + ", valid " + creds.ttl + " s (relay only)");
    return true;
  }

  async function refresh() {
    if (!(await login())) return;
    if (socket && socket.reauth()) {
      $("phone-refreshes").textContent = String(Number($("phone-refreshes").textContent) + 1);
      log("token refreshed; signaling socket re-authenticated in band" + (session ? " (call goes on)" : ""));
    }
  }

  function callOptions() {
    return {
      mediaConstraints: { audio: true, video: false },
      pcConfig: { iceServers, iceTransportPolicy: "relay" },
      rtcOfferConstraints: { offerToReceiveAudio: true },
    };
  }

  function track(s) {
    session = s;
    $("hangup").disabled = false;
    s.on("peerconnection", (e) => attachAudio(e.peerconnection));
    if (s.connection) attachAudio(s.connection);
    s.on("progress", () => { if (s.direction === "outgoing") status("ringing"); });
    s.on("accepted", () => status("in call"));
    s.on("confirmed", () => status("in call"));
    const ended = (e) => {
      status("call ended" + (e && e.cause ? " (" + e.cause + ")" : ""));
      session = null;
      $("hangup").disabled = true;
      $("answer").disabled = true;
    };
    s.on("ended", ended);
    s.on("failed", ended);
  }

  function attachAudio(pc) {
    pc.addEventListener("track", (e) => { $("remote-audio").srcObject = e.streams[0]; });
  }

  async function start() {
    ext = $("ext").value.trim();
    if (!ext) return;
    if (!(await login())) return;
    if (!(await turnCredentials())) return;
    clearInterval(refresher);
    const every = Number(new URLSearchParams(location.search).get("refresh")) || 150;
    refresher = setInterval(refresh, every * 1000);
    const url = location.origin.replace(/^http/, "ws") + "/ws/sip";
    socket = new GatehouseSocket(url);
    ua = new JsSIP.UA({
      sockets: [socket],
      uri: "sip:" + ext + "@" + DOMAIN,
      register: true,
      register_expires: 300,
      session_timers: false,
      connection_recovery_min_interval: 30,
    });
    ua.on("registered", () => { status("registered as " + ext); $("call").disabled = false; });
    ua.on("registrationFailed", (e) => status("registration failed: " + (e.response ? e.response.status_code + " " + e.response.reason_phrase : e.cause)));
    ua.on("newMessage", (e) => { if (e.originator === "remote") log("message from " + e.request.from.uri.user + ": " + e.request.body); });
    ua.on("newRTCSession", (e) => {
      track(e.session);
      if (e.originator === "remote") {
        status("incoming call from " + e.request.from.uri.user);
        $("answer").disabled = false;
      }
    });
    status("registering as " + ext);
    ua.start();
    $("phone-login").disabled = true;
  }

  function call() {
    const to = $("callee").value.trim();
    if (!ua || !to) return;
    status("calling " + to);
    ua.call("sip:" + to + "@" + DOMAIN, callOptions());
  }

  function answer() {
    if (!session) return;
    $("answer").disabled = true;
    session.answer(callOptions());
  }

  function hangup() { if (session) session.terminate(); }

  function message() {
    const to = $("callee").value.trim();
    if (ua && to) ua.sendMessage("sip:" + to + "@" + DOMAIN, $("message").value);
  }

  // What the page shows about the media path (and what the tests read): the selected candidate
  // pair's local candidate type and state, audio bytes received.
  window.phoneMedia = async () => {
    const pc = session && session.connection;
    if (!pc) return null;
    const stats = await pc.getStats();
    const out = { candidateType: null, pairState: null, bytesReceived: 0 };
    stats.forEach((s) => {
      if (s.type === "transport" && s.selectedCandidatePairId) {
        const pair = stats.get(s.selectedCandidatePairId);
        out.pairState = pair.state;
        out.candidateType = stats.get(pair.localCandidateId).candidateType;
      }
      if (s.type === "inbound-rtp" && s.kind === "audio") out.bytesReceived += s.bytesReceived;
    });
    $("phone-media").textContent = out.candidateType ? out.candidateType + " " + out.pairState + ", " + out.bytesReceived + " bytes in" : "";
    return out;
  };

  const q = new URLSearchParams(location.search);
  if (q.get("ext")) $("ext").value = q.get("ext");
  if (q.get("call")) $("callee").value = q.get("call");
  $("phone-login").onclick = start;
  $("call").onclick = call;
  $("answer").onclick = answer;
  $("hangup").onclick = hangup;
  $("send-message").onclick = message;
  setInterval(() => { if (session) window.phoneMedia(); }, 1000);
})();
