// The demo phone: gets a short-lived connect token from the dev-only login, then opens the
// signaling WebSocket with the token in Sec-WebSocket-Protocol (never in the URL, which leaks
// into logs). jwt-auth in Envoy checks it; a refusal arrives as CloseEvent.code 4401/4403/4400.
// The API is called without any token in JS: login set encrypted HttpOnly cookies for /api,
// which token-proxy in Envoy turns into a bearer token; the page only sends the CSRF value.
// Login also set the HttpOnly session cookie gh-sid: session-binding in Envoy accepts a connect
// token only with the session it names, and only once, so every connect gets a fresh token.
// Logout ends the session at the issuer; Envoy then closes the socket with 4401.
// Everything lives in one closure: no other script on the page can read the token.
"use strict";

(() => {

let token = null;
let csrf = null;
let socket = null;
let refresher = null;

const $ = (id) => document.getElementById(id);

function log(text, cls) {
  const li = document.createElement("li");
  li.textContent = new Date().toISOString().slice(11, 19) + " " + text;
  if (cls) li.className = cls;
  $("log").prepend(li);
}

// A fresh token in this browser's session (the gh-sid cookie), or null.
async function freshToken() {
  const r = await fetch("/dev/login", { method: "POST" });
  if (!r.ok) { log("login failed: HTTP " + r.status, "close"); return null; }
  const body = await r.json();
  token = body.access_token;
  csrf = body.csrf_token;
  $("expiry").textContent = new Date(Date.now() + body.expires_in * 1000).toLocaleTimeString();
  return body;
}

async function login() {
  const body = await freshToken();
  if (!body) return false;
  $("connect").disabled = false;
  $("api").disabled = false;
  $("logout").disabled = false;
  // A call outlives its connect token: refresh at half the lifetime and hand the fresh token
  // to jwt-auth in band, so the signaling socket follows the session.
  clearInterval(refresher);
  refresher = setInterval(refresh, body.expires_in * 500);
  log("logged in; token valid for " + body.expires_in + " s");
  await turnCredentials();
  return true;
}

// Short-lived TURN credentials minted by Envoy's turn-credentials filter for this user: the page
// never holds a static TURN password.
async function turnCredentials() {
  const r = await fetch("/turn-credentials", { method: "POST", headers: { authorization: "Bearer " + token } });
  if (!r.ok) { log("TURN credentials: HTTP " + r.status, "close"); return; }
  const creds = await r.json();
  const server = creds.iceServers[0];
  log("TURN credentials for " + server.username + " (" + server.urls.join(", ") + "), valid " + creds.ttl + " s");
  // new RTCPeerConnection({ iceServers: creds.iceServers }) would use them for the call.
}

async function refresh() {
  if (!(await freshToken())) return;
  if (socket && socket.readyState === WebSocket.OPEN) {
    socket.send(JSON.stringify({ type: "gatehouse.reauth", token }));
    log("token refreshed; socket re-authenticated in band");
  }
}

async function logout() {
  clearInterval(refresher);
  refresher = null;
  token = null;
  $("logout").disabled = true;
  $("connect").disabled = true;
  $("api").disabled = true;
  const r = await fetch("/dev/logout", { method: "POST" });
  log("logged out (HTTP " + r.status + "): the session is revoked; Envoy closes its socket with 4401");
}

async function connect(withToken) {
  if (socket) socket.close(1000);
  // Connect tokens are single-use: take a fresh one for this socket.
  if (withToken === undefined) {
    if (!(await freshToken())) return;
    withToken = token;
  }
  const url = location.origin.replace(/^http/, "ws") + "/ws/echo";
  socket = new WebSocket(url, ["sip", "bearer." + withToken]);
  socket.onopen = () => { log("socket open, subprotocol " + socket.protocol); $("send").disabled = false; };
  socket.onmessage = (e) => log("received: " + e.data);
  socket.onclose = (e) => {
    log("closed: code " + e.code + (e.reason ? " (" + e.reason + ")" : ""), "close");
    $("send").disabled = true;
  };
}

async function callApi() {
  const r = await fetch("/api/echo", {
    method: "POST",
    credentials: "same-origin",
    headers: { "x-gh-csrf": csrf },
  });
  if (!r.ok) { log("API: HTTP " + r.status, "close"); return; }
  const seen = (await r.json()).headers;
  const who = seen["x-gatehouse-sub"] ? " as " + seen["x-gatehouse-sub"] : "";
  log("API: HTTP " + r.status + who + " (Envoy turned the cookies into a bearer token)");
}

$("login").onclick = login;
$("logout").onclick = logout;
$("api").onclick = callApi;
$("connect").onclick = () => connect();
$("bad").onclick = () => connect("not.a.token");
$("send").onclick = () => socket && socket.send("INVITE sip:echo@gatehouse.local SIP/2.0");
})();
