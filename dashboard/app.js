// app.js: the dashboard page. It renders each view the node pushes on
// /ui/events (Server-Sent Events, fed by an etcd watch); it never polls.
// The one timer (tick) only updates the ages shown from the clock.
// Every text from etcd goes into the page as text (textContent), never
// as markup.
'use strict';

(() => {
  const csrf = document.querySelector('meta[name="csrf-token"]').content;

  // ACTIONS are the buttons a tag's row may offer, shown when the view
  // lists the action (the node offers it: dashboard.go's newDashboard)
  // and available(tag) says it applies; those with fleet(v) are offered
  // for the whole fleet too, in the header (tag null). To add one: an
  // entry here and its handler there.
  const ACTIONS = {
    rollback: {
      label: 'Roll back',
      available: (tag) => previousRolledOut(tag) !== undefined,
      confirm: (tag) => {
        const to = previousRolledOut(tag);
        return `Roll back ${familiar(tag.image)} from version ${tag.history[0].version} (${short(tag.history[0].image_id)}) ` +
          `to version ${to.version} (${short(to.image_id)})? The registry's tag is put back and every node deploys it.`;
      },
      body: (tag) => ({ image: tag.image }),
      done: (out) => `ledger version ${out.version}`,
    },
    pin: {
      label: 'Pin',
      available: (tag) => !tag.pin && newestRolledOut(tag) !== undefined,
      confirm: (tag) => {
        const v = newestRolledOut(tag);
        return `Pin ${familiar(tag.image)} to version ${v.version} (${short(v.image_id)})? Every node keeps that version, ` +
          'whatever is pushed, until it is unpinned.';
      },
      body: (tag) => ({ image: tag.image }),
      done: (out) => `pinned to version ${out.version} (${short(out.image_id)})`,
    },
    unpin: {
      label: 'Unpin',
      available: (tag) => !!tag.pin,
      confirm: (tag) => `Unpin ${familiar(tag.image)} (pinned to version ${tag.pin.version}, ${short(tag.pin.image_id)})? ` +
        'Every node deploys its newest version.',
      body: (tag) => ({ image: tag.image }),
      done: () => 'unpinned',
    },
    promote: {
      label: 'Promote',
      available: (tag) => !!tag.canary,
      confirm: (tag) => `Promote ${familiar(tag.image)} ${short(tag.canary.image_id)} (${tag.canary.state})? Every node deploys it now.`,
      body: (tag) => ({ image: tag.image }),
      done: (out) => out.state,
    },
    abort: {
      label: 'Abort',
      available: (tag) => !!tag.canary,
      confirm: (tag) => `Abort the canary rollout of ${familiar(tag.image)} ${short(tag.canary.image_id)} (${tag.canary.state})? ` +
        `It is halted and the canaries roll back to ${short(tag.canary.previous) || 'the previous version'}.`,
      body: (tag) => ({ image: tag.image }),
      done: (out) => out.state,
    },
    freeze: {
      label: 'Freeze',
      available: (tag) => !(tag.freezes || []).length,
      fleet: (v) => !v.frozen,
      confirm: (tag) => tag ? `Freeze ${familiar(tag.image)}? New versions of it wait until it is thawed.`
        : 'Freeze every image? New versions of every image wait until the fleet is thawed.',
      body: (tag) => ({ scope: tag ? tag.image : '' }),
      done: () => 'frozen',
    },
    thaw: {
      label: 'Thaw',
      available: (tag) => !!(tag.freezes || []).length,
      fleet: (v) => v.frozen,
      confirm: (tag) => tag ? `Thaw ${familiar(thawScope(tag))}? The versions it held deploy now, unless something else holds them.`
        : 'Thaw the freeze of every image? The versions it held deploy now, unless something else holds them.',
      body: (tag) => ({ scope: tag ? thawScope(tag) : '' }),
      done: (out) => `released ${(out.released || []).map(familiar).join(', ') || 'nothing'}`,
    },
  };

  // dashRenders records when each view was read by the node and rendered,
  // for the browser test.
  window.dashRenders = [];

  const $ = (id) => document.getElementById(id);
  const SVG = 'http://www.w3.org/2000/svg';

  function el(name, attrs, ...children) {
    const e = document.createElement(name);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null || v === false) continue;
      if (k === 'class') e.className = v;
      else if (k === 'dataset') Object.assign(e.dataset, v);
      else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
      else e.setAttribute(k, v);
    }
    for (const c of children.flat()) {
      if (c === undefined || c === null || c === false) continue;
      e.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return e;
  }

  function svg(name, attrs, ...children) {
    const e = document.createElementNS(SVG, name);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
    return e;
  }

  const short = (id) => (id || '').replace(/^sha256:/, '').slice(0, 12);
  const familiar = (ref) => ref.replace(/^docker\.io\/library\//, '').replace(/^docker\.io\//, '');
  const stateClass = (s) => 'state-' + s.replace(/[^a-z]+/g, '-');

  function duration(ms) {
    let s = Math.max(0, Math.round(ms / 1000));
    if (s < 60) return s + 's';
    let m = Math.floor(s / 60); s %= 60;
    if (m < 60) return `${m}m ${s}s`;
    let h = Math.floor(m / 60); m %= 60;
    if (h < 48) return `${h}h ${m}m`;
    return `${Math.floor(h / 24)}d ${h % 24}h`;
  }
  const secs = (x) => (x >= 10 ? x.toFixed(0) : x.toFixed(1)) + 's';

  // An age: "since" is rendered relative to now, and kept current by tick.
  const age = (t, suffix) => el('span', { class: 'age', dataset: { since: t, suffix: suffix || '' }, title: t },
    duration(Date.now() - Date.parse(t)) + (suffix || ''));
  function tick() {
    for (const e of document.querySelectorAll('.age')) {
      e.textContent = duration(Date.now() - Date.parse(e.dataset.since)) + e.dataset.suffix;
    }
  }

  const newestRolledOut = (tag) => (tag.history || []).find((v) => v.outcome === 'rolled out');
  // thawScope is the freeze a tag's Thaw lifts: the tag's own, else its
  // repository's.
  const thawScope = (tag) => (tag.freezes.includes(tag.image) ? tag.image : tag.freezes[0]);

  function previousRolledOut(tag) {
    const h = tag.history || [];
    if (h.length < 2) return undefined;
    return h.slice(1).find((v) => v.outcome === 'rolled out' && v.image_id !== h[0].image_id);
  }

  const badge = (word, title, cls) => el('span', { class: 'badge ' + (cls || stateClass(word)), title }, word);

  function renderRecords(v) {
    $('records').replaceChildren(...v.records.map((m) =>
      el('div', { class: 'record' }, badge(m.word, m.key, 'mark'), ' ', el('code', {}, m.key), ' ', m.value)));
  }

  function renderFleet(v) {
    $('fleet-actions').replaceChildren(...v.actions.filter((a) => ACTIONS[a] && ACTIONS[a].fleet && ACTIONS[a].fleet(v)).map((a) =>
      el('button', { type: 'button', class: 'action', dataset: { action: a, fleet: 'yes' }, onclick: () => act(a, null) }, ACTIONS[a].label + ' all')));
  }

  function renderMatrix(v) {
    if (v.tags.length === 0) {
      $('matrix').replaceChildren(el('p', { class: 'empty' }, 'No container runs from a tag on any node yet.'));
      return;
    }
    const head = el('tr', {}, el('th', {}, 'Image tag'), v.nodes.map((n) => el('th', {}, n.node)), el('th', {}, ''));
    const rows = v.tags.map((t) => {
      const marks = (t.marks || []).filter((m) => !m.node).map((m) => badge(m.word, `${m.key} ${m.value}`, 'mark'));
      const name = el('td', { class: 'tag' }, el('div', { class: 'ref', title: t.image }, familiar(t.image)),
        t.newest ? el('div', { class: 'newest' }, 'newest ', el('code', {}, short(t.newest))) : null,
        t.halted ? badge('halted', `${short(t.halted.image_id)} on ${t.halted.node}: ${t.halted.reason}`) : null, marks);
      const cells = t.cells.map((c) => {
        if (!c.state) return el('td', { class: 'cell none' }, '–');
        // A node replacing its container may run none of the tag for a moment.
        const ids = (c.image_ids || []).map((id, i) => el('div', { class: 'id' },
          (c.versions || [])[i] ? el('span', { class: 'version' }, 'v' + c.versions[i]) : null, ' ', el('code', {}, short(id))));
        return el('td', { class: 'cell ' + stateClass(c.state), dataset: { node: c.node, state: c.state }, title: c.detail || '' },
          ids, el('div', { class: 'state' }, c.state), c.detail ? el('div', { class: 'detail' }, c.detail) : null,
          (c.marks || []).map((m) => badge(m, m, 'mark')));
      });
      // In ACTIONS' order: the buttons of a row stay where they were.
      const acts = el('td', { class: 'actions' }, Object.keys(ACTIONS).filter((a) => v.actions.includes(a) && ACTIONS[a].available(t)).map((a) =>
        el('button', { type: 'button', class: 'action', dataset: { action: a, image: t.image }, onclick: () => act(a, t) }, ACTIONS[a].label)));
      return el('tr', { dataset: { image: t.image } }, name, cells, acts);
    });
    $('matrix').replaceChildren(el('table', { class: 'matrix' }, el('thead', {}, head), el('tbody', {}, rows)));
  }

  function renderRollouts(v) {
    const items = [];
    for (const t of v.tags) {
      const newest = (t.history || [])[0];
      const rolling = newest && newest.outcome === 'rolling out';
      if (!(t.slots || []).length && !t.halted && !(t.down || []).length && !rolling) continue;
      const running = t.cells.filter((c) => c.state).length;
      const done = t.cells.filter((c) => c.state === 'up to date').length;
      items.push(el('li', { dataset: { image: t.image } },
        el('b', {}, familiar(t.image)), ' ',
        t.newest ? el('span', {}, 'to ', el('code', {}, short(t.newest)), ` · ${done} of ${running} nodes up to date`) : null,
        (t.slots || []).length ? el('ul', {}, t.slots.map((s) => el('li', {}, badge(s.state), ` ${s.node} ${s.container}`))) : null,
        t.halted ? el('div', { class: 'halt' }, badge('halted'), ` ${short(t.halted.image_id)} failed on ${t.halted.node} `,
          age(t.halted.time, ' ago'), `: ${t.halted.reason}`) : null,
        (t.down || []).length ? el('div', {}, badge('down'), ' ' + t.down.join(', ')) : null));
    }
    $('rollouts').replaceChildren(items.length ? el('ul', { class: 'rollouts' }, items) : el('p', { class: 'empty' }, 'Nothing rolling out, nothing halted.'));
  }

  function renderNodes(v) {
    const rows = v.nodes.map((n) => el('tr', { dataset: { node: n.node } },
      el('td', {}, n.node, n.node === v.node ? ' (this page)' : ''), el('td', {}, el('code', {}, n.version)),
      el('td', {}, age(n.started)), el('td', {}, age(n.updated, ' ago')), el('td', {}, (n.containers || []).length),
      el('td', {}, (n.retries || []).map((r) => el('div', { class: 'retry' }, `${r.repo}: attempt ${r.attempts}: ${r.error}`)))));
    $('nodes').replaceChildren(el('table', { class: 'nodes' },
      el('thead', {}, el('tr', {}, ['Node', 'Deployer', 'Up', 'Last report', 'Containers', 'Retrying'].map((h) => el('th', {}, h)))),
      el('tbody', {}, rows)));
  }

  // chart draws a tag's lead times, oldest version on the left: the dark
  // part of a bar is push → first node, the light part first → last node.
  function chart(history) {
    const vs = history.slice().reverse();
    const W = 360, H = 90, pad = 18, bw = Math.min(24, (W - pad) / Math.max(vs.length, 1) - 4);
    const top = Math.max(1, ...vs.map((v) => v.lead_last_seconds || v.lead_first_seconds || 0));
    const y = (s) => H - pad - (s / top) * (H - 2 * pad);
    const g = svg('svg', { class: 'chart', width: W, height: H, viewBox: `0 0 ${W} ${H}`, role: 'img' },
      svg('title', {}, 'Lead times per version: push → first node (dark), → last node (light)'),
      svg('line', { x1: pad, y1: H - pad, x2: W, y2: H - pad, class: 'axis' }),
      svg('text', { x: 2, y: pad - 4, class: 'axis-label' }, secs(top)));
    vs.forEach((v, i) => {
      const x = pad + 4 + i * (bw + 4);
      const first = v.lead_first_seconds || 0, last = v.lead_last_seconds || first;
      const bar = svg('g', { class: 'bar outcome-' + v.outcome.replace(/\s+/g, '-') },
        svg('title', {}, `v${v.version} ${short(v.image_id)}: ${v.outcome}; first node ${secs(first)}, last node ${secs(last)}`),
        svg('rect', { x, y: y(last), width: bw, height: Math.max(0, y(first) - y(last)), class: 'last' }),
        svg('rect', { x, y: y(first), width: bw, height: Math.max(0, H - pad - y(first)), class: 'first' }),
        svg('text', { x: x + bw / 2, y: H - 4, class: 'bar-label' }, 'v' + v.version));
      if (!v.lead_last_seconds && !v.lead_first_seconds) {
        bar.append(svg('rect', { x, y: H - pad - 3, width: bw, height: 3, class: 'none' }));
      }
      g.append(bar);
    });
    return g;
  }

  function renderHistory(v) {
    const tags = v.tags.filter((t) => (t.history || []).length);
    if (!tags.length) {
      $('history').replaceChildren(el('p', { class: 'empty' }, 'No version in the deploy ledger yet.'));
      return;
    }
    $('history').replaceChildren(...tags.map((t) => {
      const rows = t.history.map((h) => {
        const nodes = Object.entries(h.nodes || {}).sort();
        const ok = nodes.filter(([, r]) => r.converged).map(([n]) => n);
        const failed = nodes.filter(([, r]) => r.failed).map(([n, r]) => `${n}: ${r.reason || 'failed'}`);
        const by = h.asked_by || {};
        return el('tr', {},
          el('td', {}, 'v' + h.version), el('td', {}, el('code', {}, short(h.image_id))),
          el('td', {}, age(h.pushed, ' ago')), el('td', {}, [by.command || by.source, by.remote].filter(Boolean).join(' from ')),
          el('td', {}, badge(h.outcome)), el('td', {}, ok.join(', '), failed.length ? el('div', { class: 'failed' }, failed.join('; ')) : null),
          el('td', { class: 'num' }, h.lead_first_seconds ? secs(h.lead_first_seconds) : '–'),
          el('td', { class: 'num' }, h.lead_last_seconds ? secs(h.lead_last_seconds) : '–'));
      });
      return el('div', { class: 'tag-history', dataset: { image: t.image } },
        el('h3', {}, familiar(t.image)), chart(t.history),
        el('table', { class: 'history' },
          el('thead', {}, el('tr', {}, ['Version', 'Image', 'Pushed', 'Asked by', 'Outcome', 'Nodes', 'First node', 'Last node'].map((x) => el('th', {}, x)))),
          el('tbody', {}, rows)));
    }));
  }

  // render draws each part of the view; a part that fails keeps its last
  // drawing and says so in the console, and the others are drawn.
  function render(v) {
    for (const part of [renderFleet, renderRecords, renderMatrix, renderRollouts, renderNodes, renderHistory]) {
      try {
        part(v);
      } catch (e) {
        console.error(`${part.name}: ${e}`);
      }
    }
  }

  let toastTimer;
  function toast(text, bad) {
    const t = $('toast');
    t.textContent = text;
    t.className = bad ? 'bad shown' : 'shown';
    clearTimeout(toastTimer);
    toastTimer = setTimeout(() => { t.className = ''; }, bad ? 20000 : 6000);
  }

  // act asks for a confirmation, then posts the action with the CSRF token.
  function act(name, tag) {
    const a = ACTIONS[name];
    const dlg = $('confirm');
    $('confirm-text').textContent = a.confirm(tag);
    $('confirm-ok').textContent = a.label;
    dlg.returnValue = '';
    dlg.onclose = async () => {
      if (dlg.returnValue !== 'ok') return;
      const what = tag ? familiar(tag.image) : 'every image';
      toast(`${a.label}: ${what}…`);
      try {
        const resp = await fetch('/ui/action/' + encodeURIComponent(name), {
          method: 'POST', credentials: 'same-origin',
          headers: { 'Content-Type': 'application/json', 'X-CSRF-Token': csrf },
          body: JSON.stringify(a.body(tag)),
        });
        const out = await resp.json().catch(() => ({}));
        toast(resp.ok ? `${a.label}: ${what}: done (${a.done(out)})` : `${a.label} refused: ${out.error || resp.status}`, !resp.ok);
      } catch (e) {
        toast(`${a.label} failed: ${e}`, true);
      }
    };
    dlg.showModal();
  }

  const es = new EventSource('/ui/events');
  es.addEventListener('view', (e) => {
    const v = JSON.parse(e.data);
    render(v);
    $('problem').hidden = true;
    $('conn').textContent = `live · revision ${v.rev}`;
    $('conn').className = 'conn live';
    window.dashRenders.push({ rev: v.rev, t: Date.now(), read: Date.parse(v.time) });
  });
  es.addEventListener('problem', (e) => {
    $('problem').textContent = 'The node cannot read etcd: ' + JSON.parse(e.data).error + ' (retrying; the page shows the last view)';
    $('problem').hidden = false;
  });
  es.onerror = () => {
    if (es.readyState === EventSource.CLOSED) {
      // Refused (the session ended): the page asks to log in again.
      location.reload();
      return;
    }
    $('conn').textContent = 'reconnecting…';
    $('conn').className = 'conn down';
  };
  setInterval(tick, 1000);
})();
