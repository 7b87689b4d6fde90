// A Node.js http server for the real-server tests: listens on the inherited fd 3 (handoffd's
// first listener), after APP_IMPORT_DELAY seconds; APP_MODE as in tests/servers/__init__.py.
"use strict";
const http = require("http");

const version = process.env.APP_VERSION || "0";
const mode = process.env.APP_MODE || "ok";
const delay = parseFloat(process.env.APP_IMPORT_DELAY || "0") * 1000;
const crashAfter = parseFloat(process.env.APP_CRASH_AFTER || "1") * 1000;

if (mode === "exit" || mode === "import-error") {
  console.error(`node_server: version ${version} exits at start-up (APP_MODE=${mode})`);
  process.exit(1);
}

const server = http.createServer((req, res) => {
  const body = `version ${version} pid ${process.pid}\n`;
  res.writeHead(200, {
    "Content-Type": "text/plain",
    "Content-Length": Buffer.byteLength(body),
    "X-Handoff-Generation": version,
    "X-Handoff-Pid": String(process.pid),
  });
  res.end(body);
});

// Graceful stop: stop accepting, finish what is in flight, close idle keep-alive connections.
process.on("SIGTERM", () => {
  server.close(() => process.exit(0));
  server.closeIdleConnections();
});

setTimeout(() => {
  server.listen({ fd: 3 }, () => {
    if (mode === "crash-after-ready") {
      setTimeout(() => process.exit(1), crashAfter);
    }
  });
}, delay);
