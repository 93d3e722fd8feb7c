package ui

import (
	"fmt"
	"html/template"
	"math"
	"sort"
	"strings"
	"time"
)

// The pictures are SVG drawn here, on the server: no script draws anything in the
// browser. Every string that goes into one passes through esc.

func esc(s string) string { return template.HTMLEscapeString(s) }

// Point is one value of a series at a time.
type Point struct {
	T time.Time
	V float64
}

// Series is one line of a chart.
type Series struct {
	Name   string
	Class  string // CSS class of its line (s0..s4)
	Points []Point
}

const (
	chartW, chartH = 560, 180
	padL, padR     = 48, 12
	padT, padB     = 14, 28
)

// lineChart draws series over a shared time axis, with the y axis from 0 to the largest
// value (or max, if larger); unit labels the axis.
func lineChart(title string, series []Series, unit string, max float64) template.HTML {
	var b strings.Builder
	fmt.Fprintf(&b, `<svg class="chart" role="img" viewBox="0 0 %d %d" width="%d" height="%d" aria-label="%s">`, chartW, chartH, chartW, chartH, esc(title))
	fmt.Fprintf(&b, `<title>%s</title>`, esc(title))
	var t0, t1 time.Time
	n := 0
	for _, s := range series {
		for _, p := range s.Points {
			if t0.IsZero() || p.T.Before(t0) {
				t0 = p.T
			}
			if p.T.After(t1) {
				t1 = p.T
			}
			max = math.Max(max, p.V)
			n++
		}
	}
	if max <= 0 {
		max = 1
	}
	max = niceCeil(max)
	x0, x1, y0, y1 := float64(padL), float64(chartW-padR), float64(chartH-padB), float64(padT)
	// axes and grid
	for i := 0; i <= 4; i++ {
		v := max * float64(i) / 4
		y := y0 + (y1-y0)*float64(i)/4
		fmt.Fprintf(&b, `<line class="grid" x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f"/>`, x0, y, x1, y)
		fmt.Fprintf(&b, `<text class="axis" x="%.1f" y="%.1f" text-anchor="end">%s</text>`, x0-4, y+4, esc(fmtNum(v)))
	}
	fmt.Fprintf(&b, `<text class="axis" x="%.1f" y="%d">%s</text>`, x0, padT-3, esc(unit))
	if n == 0 {
		fmt.Fprintf(&b, `<text class="empty" x="%d" y="%d" text-anchor="middle">no samples yet</text></svg>`, chartW/2, chartH/2)
		return template.HTML(b.String())
	}
	span := t1.Sub(t0).Seconds()
	if span <= 0 {
		span = 1
	}
	fmt.Fprintf(&b, `<text class="axis" x="%.1f" y="%d">%s</text>`, x0, chartH-8, esc(t0.Local().Format("15:04:05")))
	fmt.Fprintf(&b, `<text class="axis" x="%.1f" y="%d" text-anchor="end">%s</text>`, x1, chartH-8, esc(t1.Local().Format("15:04:05")))
	for i, s := range series {
		if len(s.Points) == 0 {
			continue
		}
		cls := s.Class
		if cls == "" {
			cls = fmt.Sprintf("s%d", i%5)
		}
		var pts []string
		for _, p := range s.Points {
			x := x0 + (x1-x0)*p.T.Sub(t0).Seconds()/span
			y := y0 + (y1-y0)*p.V/max
			pts = append(pts, fmt.Sprintf("%.1f,%.1f", x, y))
		}
		fmt.Fprintf(&b, `<polyline class="line %s" points="%s"><title>%s</title></polyline>`, esc(cls), strings.Join(pts, " "), esc(s.Name))
		if len(s.Points) == 1 {
			fmt.Fprintf(&b, `<circle class="dot %s" cx="%s" r="3"/>`, esc(cls), strings.Replace(pts[0], ",", `" cy="`, 1))
		}
	}
	// legend
	lx := x0 + 80
	for i, s := range series {
		cls := s.Class
		if cls == "" {
			cls = fmt.Sprintf("s%d", i%5)
		}
		fmt.Fprintf(&b, `<rect class="key %s" x="%.1f" y="%d" width="10" height="3"/><text class="legend" x="%.1f" y="%d">%s</text>`, esc(cls), lx, padT+2, lx+14, padT+6, esc(s.Name))
		lx += 24 + 7*float64(len(s.Name))
	}
	b.WriteString(`</svg>`)
	return template.HTML(b.String())
}

// Bar is one bar of a bar chart.
type Bar struct {
	Label string
	Value float64
	Note  string // shown after the value
}

// barChart draws horizontal bars scaled to the largest value.
func barChart(title string, bars []Bar, format func(float64) string) template.HTML {
	const w, rowH, labelW = 560, 22, 120
	h := rowH*len(bars) + 8
	if len(bars) == 0 {
		h = 40
	}
	var b strings.Builder
	fmt.Fprintf(&b, `<svg class="chart bars" role="img" viewBox="0 0 %d %d" width="%d" height="%d" aria-label="%s"><title>%s</title>`, w, h, w, h, esc(title), esc(title))
	if len(bars) == 0 {
		fmt.Fprintf(&b, `<text class="empty" x="%d" y="24" text-anchor="middle">no data yet</text></svg>`, w/2)
		return template.HTML(b.String())
	}
	max := 0.0
	for _, x := range bars {
		max = math.Max(max, x.Value)
	}
	if max <= 0 {
		max = 1
	}
	for i, x := range bars {
		y := 4 + i*rowH
		bw := (w - labelW - 110) * x.Value / max
		fmt.Fprintf(&b, `<text class="axis" x="%d" y="%d" text-anchor="end">%s</text>`, labelW-6, y+14, esc(x.Label))
		fmt.Fprintf(&b, `<rect class="bar s%d" x="%d" y="%d" width="%.1f" height="%d"><title>%s %s</title></rect>`, i%5, labelW, y+3, math.Max(bw, 1), rowH-8, esc(x.Label), esc(format(x.Value)))
		fmt.Fprintf(&b, `<text class="value" x="%.1f" y="%d">%s</text>`, float64(labelW)+math.Max(bw, 1)+6, y+14, esc(strings.TrimSpace(format(x.Value)+" "+x.Note)))
	}
	b.WriteString(`</svg>`)
	return template.HTML(b.String())
}

// niceCeil rounds v up to 1, 2 or 5 times a power of ten.
func niceCeil(v float64) float64 {
	p := math.Pow(10, math.Floor(math.Log10(v)))
	for _, m := range []float64{1, 2, 5, 10} {
		if m*p >= v {
			return m * p
		}
	}
	return 10 * p
}

func fmtNum(v float64) string {
	switch {
	case v == 0:
		return "0"
	case math.Abs(v) >= 100 || v == math.Trunc(v):
		return fmt.Sprintf("%.0f", v)
	case math.Abs(v) >= 1:
		return fmt.Sprintf("%.1f", v)
	}
	return fmt.Sprintf("%.2g", v)
}

// Node kinds of a provenance graph.
const (
	NodeArtifact  = "artifact"  // a file some action produced
	NodeSubject   = "subject"   // the artifact the page is about
	NodeSource    = "source"    // a file no action produced
	NodeToolchain = "toolchain" // a toolchain image
	NodeAction    = "action"    // an action (its link)
	NodeConsumer  = "consumer"  // an action that took the subject as an input
	NodeMore      = "more"      // several nodes left out, counted
)

// Node is one box of a graph.
type Node struct {
	ID    string
	Kind  string
	Label string
	Title string // the full name, shown on hover
	Href  string
	layer int
	order float64
}

// Edge is an arrow from one node to another (by ID).
type Edge struct{ From, To string }

// Graph is a DAG drawn in layers, left to right.
type Graph struct {
	Nodes []*Node
	Edges []Edge
	byID  map[string]*Node
}

// Add adds n unless a node with its ID exists; it returns the node with that ID.
func (g *Graph) Add(n *Node) *Node {
	if g.byID == nil {
		g.byID = map[string]*Node{}
	}
	if o := g.byID[n.ID]; o != nil {
		return o
	}
	g.byID[n.ID] = n
	g.Nodes = append(g.Nodes, n)
	return n
}

// Link adds an edge between two added nodes, once.
func (g *Graph) Link(from, to string) {
	for _, e := range g.Edges {
		if e.From == from && e.To == to {
			return
		}
	}
	g.Edges = append(g.Edges, Edge{from, to})
}

// layout assigns layers (longest path from the nodes without inputs) and an order in
// each layer (a few barycenter sweeps, which keep edges from crossing much).
func (g *Graph) layout() [][]*Node {
	preds := map[string][]string{}
	succs := map[string][]string{}
	for _, e := range g.Edges {
		preds[e.To] = append(preds[e.To], e.From)
		succs[e.From] = append(succs[e.From], e.To)
	}
	// longest path, by Kahn's algorithm (the graph is acyclic: links only go from
	// materials to products; a cycle's nodes are left in layer 0)
	indeg := map[string]int{}
	for _, n := range g.Nodes {
		indeg[n.ID] = len(preds[n.ID])
	}
	var queue []*Node
	for _, n := range g.Nodes {
		if indeg[n.ID] == 0 {
			queue = append(queue, n)
		}
	}
	for len(queue) > 0 {
		n := queue[0]
		queue = queue[1:]
		for _, s := range succs[n.ID] {
			m := g.byID[s]
			m.layer = max(m.layer, n.layer+1)
			if indeg[s]--; indeg[s] == 0 {
				queue = append(queue, m)
			}
		}
	}
	// Sources and toolchains sit right before their first consumer, not all in column 0.
	for _, n := range g.Nodes {
		if len(preds[n.ID]) == 0 && len(succs[n.ID]) > 0 {
			l := math.MaxInt
			for _, s := range succs[n.ID] {
				l = min(l, g.byID[s].layer)
			}
			n.layer = max(0, l-1)
		}
	}
	nl := 0
	for _, n := range g.Nodes {
		nl = max(nl, n.layer+1)
	}
	layers := make([][]*Node, nl)
	for _, n := range g.Nodes {
		layers[n.layer] = append(layers[n.layer], n)
	}
	for _, l := range layers {
		sort.SliceStable(l, func(i, j int) bool { return l[i].Label < l[j].Label })
		for i, n := range l {
			n.order = float64(i)
		}
	}
	bary := func(n *Node, nb []string) (float64, bool) {
		if len(nb) == 0 {
			return 0, false
		}
		s := 0.0
		for _, id := range nb {
			s += g.byID[id].order
		}
		return s / float64(len(nb)), true
	}
	for pass := 0; pass < 4; pass++ {
		for li := range layers {
			if pass%2 == 1 {
				li = len(layers) - 1 - li
			}
			l := layers[li]
			key := map[*Node]float64{}
			for _, n := range l {
				nb := preds[n.ID]
				if pass%2 == 1 {
					nb = succs[n.ID]
				}
				if v, ok := bary(n, nb); ok {
					key[n] = v
				} else {
					key[n] = n.order
				}
			}
			sort.SliceStable(l, func(i, j int) bool { return key[l[i]] < key[l[j]] })
			for i, n := range l {
				n.order = float64(i)
			}
		}
	}
	return layers
}

// SVG draws the graph: boxes in columns by layer, curved edges between them, every
// box a link to its page.
func (g *Graph) SVG(title string) template.HTML {
	const colW, boxW, rowH, boxH, pad = 215, 180, 34, 24, 10
	layers := g.layout()
	rows := 1
	for _, l := range layers {
		rows = max(rows, len(l))
	}
	w, h := pad*2+colW*len(layers), pad*2+rowH*rows
	pos := map[string][2]float64{}
	for li, l := range layers {
		off := float64(rows-len(l)) * rowH / 2 // center short columns
		for _, n := range l {
			pos[n.ID] = [2]float64{float64(pad + li*colW), float64(pad) + off + n.order*rowH}
		}
	}
	var b strings.Builder
	fmt.Fprintf(&b, `<svg class="graph" role="img" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 %d %d" width="%d" height="%d" aria-label="%s"><title>%s</title>`, w, h, w, h, esc(title), esc(title))
	b.WriteString(`<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z"/></marker></defs>`)
	for _, e := range g.Edges {
		a, z := pos[e.From], pos[e.To]
		x1, y1 := a[0]+boxW, a[1]+boxH/2
		x2, y2 := z[0], z[1]+boxH/2
		mx := (x1 + x2) / 2
		fmt.Fprintf(&b, `<path class="edge" d="M%.1f,%.1f C%.1f,%.1f %.1f,%.1f %.1f,%.1f" marker-end="url(#arrow)"/>`, x1, y1, mx, y1, mx, y2, x2, y2)
	}
	for _, n := range g.Nodes {
		p := pos[n.ID]
		label := n.Label
		if r := []rune(label); len(r) > 26 {
			label = "…" + string(r[len(r)-25:])
		}
		tip := n.Title
		if tip == "" {
			tip = n.Label
		}
		open, close := "", ""
		if n.Href != "" {
			open, close = fmt.Sprintf(`<a href="%s">`, esc(n.Href)), `</a>`
		}
		fmt.Fprintf(&b, `<g class="node %s" data-kind="%s" data-id="%s">%s<title>%s</title><rect x="%.1f" y="%.1f" width="%d" height="%d" rx="4"/><text x="%.1f" y="%.1f">%s</text>%s</g>`,
			esc(n.Kind), esc(n.Kind), esc(n.ID), open, esc(tip), p[0], p[1], boxW, boxH, p[0]+8, p[1]+16, esc(label), close)
	}
	b.WriteString(`</svg>`)
	return template.HTML(b.String())
}
