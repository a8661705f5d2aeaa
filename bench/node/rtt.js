// Round trips of a 64-byte object.
//   node rtt.js ping --count N --warmup W -- CHILD...
//   node rtt.js echo
'use strict'
const { parseArgs, messageMaker, emit, startChild, dieWithParent, nowUs, percentile } = require('./common')

const { role, opts, child: childCmd } = parseArgs(process.argv.slice(2))
dieWithParent()

if (role === 'ping') {
  const count = Number(opts.count || 10000)
  const warmup = Number(opts.warmup || 1000)
  const make = messageMaker(64)
  const child = startChild(childCmd)
  const samples = []
  let i = 0
  let t = 0
  let ready = false
  child.on('message', (m) => {
    if (!ready) {
      if (m !== 'ready') return
      ready = true
    } else {
      if (i >= warmup) samples.push(nowUs() - t)
      i++
      if (i >= warmup + count) {
        child.disconnect()
        return
      }
    }
    t = nowUs()
    child.send(make(i))
  })
  child.on('exit', (code) => {
    samples.sort((a, b) => a - b)
    const mean = samples.reduce((a, b) => a + b, 0) / Math.max(1, samples.length)
    emit('rtt-ping', { count: samples.length, p50_us: percentile(samples, 50), p99_us: percentile(samples, 99), mean_us: mean })
    process.exit(code === null ? 1 : code)
  })
} else if (role === 'echo') {
  process.on('message', (m) => { process.send(m) })
  process.send('ready')
} else {
  console.error('rtt.js: unknown role ' + role)
  process.exit(2)
}
