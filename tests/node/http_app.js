// An unchanged Node HTTP app, the kind `handoff run -- node http_app.js` serves: it knows nothing
// of clusters. Answers every request with its pid. With SLOW_MS in the query (`/?slow=MS`) it
// answers after that many milliseconds (a request in flight across a reload or a stop). With
// CRASH_FILE set and that file present it exits 3 at start; with START_DELAY_MS it listens only
// after that long (a replacement still starting).
'use strict'
const http = require('http')
const fs = require('fs')
if (process.env.CRASH_FILE && fs.existsSync(process.env.CRASH_FILE)) {
  console.error('http_app: crashing at start as asked')
  process.exit(3)
}
const server = http.createServer((req, res) => {
  const slow = Number(new URL(req.url, 'http://x').searchParams.get('slow') || 0)
  setTimeout(() => res.end(String(process.pid)), slow)
})
setTimeout(() => server.listen(process.env.PORT, process.env.HOST), Number(process.env.START_DELAY_MS || 0))
