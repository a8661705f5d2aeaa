// Many children on one parent (see bench/src/roles/children.rs for the design): start
// --children echo children (each with its own channel, as child_process.fork does), keep
// --window 64-byte messages in flight on every channel, answer each echo with the next message.
//   node children.js parent --children N --window W --warmup S --secs S --clk-tck T -- CHILD...
'use strict'
const fs = require('fs')
const { parseArgs, messageMaker, emit, startChild, dieWithParent } = require('./common')

const { role, opts, child: childCmd } = parseArgs(process.argv.slice(2))
dieWithParent()

// A KiB field of /proc/PID/status (VmRSS, RssAnon).
function statusKib (pid, name) {
  const status = fs.readFileSync(`/proc/${pid}/status`, 'utf8')
  const line = status.split('\n').find((l) => l.startsWith(name + ':'))
  return Number(line.split(/\s+/)[1])
}
const rssKib = (pid) => statusKib(pid, 'VmRSS')
const ownMemory = () => ({ rss: statusKib(process.pid, 'VmRSS'), anon: statusKib(process.pid, 'RssAnon') })

// Pss in KiB.
function pssKib (pid) {
  const text = fs.readFileSync(`/proc/${pid}/smaps_rollup`, 'utf8')
  const line = text.split('\n').find((l) => l.startsWith('Pss:'))
  return Number(line.split(/\s+/)[1])
}

// utime + stime in seconds.
function cpuSeconds (pid, clkTck) {
  const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8')
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ')
  return (Number(fields[11]) + Number(fields[12])) / clkTck
}

const mean = (xs) => xs.reduce((a, b) => a + b, 0) / Math.max(1, xs.length)

if (role === 'parent') {
  const n = Number(opts.children || 64)
  const window = Number(opts.window || 32)
  const warmup = Number(opts.warmup || 0.5)
  const secs = Number(opts.secs || 2)
  const clkTck = Number(opts['clk-tck'])
  if (!(clkTck > 0)) throw new Error('--clk-tck is required')
  const make = messageMaker(64)
  const before = ownMemory()
  const kids = []
  for (let i = 0; i < n; i++) {
    const child = startChild(childCmd)
    kids.push({ child, ready: false, count: 0, inFlight: 0, seq: 0, exited: false, code: null })
  }
  const pids = kids.map((k) => k.child.pid)
  let readyCount = 0
  let stopping = false
  let ready = 0
  let m0 = null
  let m1 = null
  let mem = null
  let exits = 0
  const mark = () => {
    const counts = kids.map((k) => k.count)
    const at = process.hrtime.bigint()
    return {
      at,
      counts,
      parentCpu: cpuSeconds(process.pid, clkTck),
      childrenCpu: pids.reduce((a, p) => a + cpuSeconds(p, clkTck), 0)
    }
  }
  const start = () => {
    ready = ownMemory()
    for (const k of kids) {
      for (let j = 0; j < window; j++) k.child.send(make(k.seq++))
      k.inFlight = window
    }
    setTimeout(() => {
      m0 = mark()
      setTimeout(() => {
        m1 = mark()
        mem = {
          parent: ownMemory(),
          rss: pids.map(rssKib),
          pss: pids.map(pssKib)
        }
        stopping = true
      }, secs * 1000)
    }, warmup * 1000)
  }
  kids.forEach((k, i) => {
    k.child.on('message', (m) => {
      if (!k.ready) {
        if (m !== 'ready') return
        k.ready = true
        if (++readyCount === n) start()
        return
      }
      k.count++
      k.inFlight--
      if (!stopping) {
        k.child.send(make(k.seq++))
        k.inFlight++
      } else if (k.inFlight === 0) {
        k.child.disconnect()
      }
    })
    k.child.on('exit', (code, signal) => {
      k.exited = true
      k.code = code
      if (code !== 0) {
        console.error(`children.js: child ${i} exited with ${code === null ? signal : code}`)
        process.exit(1)
      }
      if (++exits === n) finish()
    })
  })
  function finish () {
    if (!m1) {
      console.error('children.js: the children exited before the end of the run')
      process.exit(1)
    }
    const perChannel = m1.counts.map((c, i) => c - m0.counts[i])
    emit('children-parent', {
      children: n,
      window,
      count: perChannel.reduce((a, b) => a + b, 0),
      secs: Number(m1.at - m0.at) / 1e9,
      per_channel_min: Math.min(...perChannel),
      per_channel_max: Math.max(...perChannel),
      per_channel_mean: mean(perChannel),
      parent_cpu_s: m1.parentCpu - m0.parentCpu,
      children_cpu_s: m1.childrenCpu - m0.childrenCpu,
      parent_rss_before_kib: before.rss,
      parent_rss_ready_kib: ready.rss,
      parent_rss_active_kib: mem.parent.rss,
      parent_anon_before_kib: before.anon,
      parent_anon_ready_kib: ready.anon,
      parent_anon_active_kib: mem.parent.anon,
      child_rss_kib_mean: mean(mem.rss),
      child_pss_kib_mean: mean(mem.pss),
      child_rss_kib: mem.rss
    })
    process.exit(0)
  }
} else {
  console.error('children.js: unknown role ' + role)
  process.exit(2)
}
