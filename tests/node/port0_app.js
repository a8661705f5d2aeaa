// An unchanged Node TCP app listening on port 0: under Node's cluster every worker's `listen(0)`
// shares one port chosen by the primary; it must be the same under handoff's. Answers `pid=N`.
'use strict'
const net = require('net')
net.createServer((socket) => socket.end(`pid=${process.pid}\n`)).listen(0, '127.0.0.1')
