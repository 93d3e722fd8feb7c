package verify

import (
	"fmt"
	"io"
	"strings"
)

// Summary is the verdict in one line: the ExecuteResponse message and the link's
// note of kiln serve, and the last line of kiln verify's text report.
func (r *Report) Summary() string {
	switch {
	case r.BaselineFailed:
		return fmt.Sprintf("not verified: the action failed in the baseline run (exit code %d)", r.Runs[0].Exit)
	case r.Deterministic:
		return fmt.Sprintf("%d runs, deterministic (varied: %s)", r.Compared, r.variedList())
	}
	var parts []string
	for i, d := range r.Differences {
		if i == 5 {
			parts = append(parts, fmt.Sprintf("and %d more", len(r.Differences)-i))
			break
		}
		p := d.Output + " differs"
		if len(d.Causes) > 0 {
			p += " under " + strings.Join(d.Causes, " and ")
		} else {
			p += fmt.Sprintf(" in run %d", d.Run)
		}
		if d.FirstDifferentByte >= 0 {
			p += fmt.Sprintf(" (%d vs %d bytes, first different byte %d)", d.Baseline.Size, d.Other.Size, d.FirstDifferentByte)
		}
		parts = append(parts, p)
	}
	return fmt.Sprintf("%d runs, NONDETERMINISTIC: %s", r.Compared, strings.Join(parts, "; "))
}

// variedList names the variations applied, with those that could not vary.
func (r *Report) variedList() string {
	var on []string
	for _, n := range r.Variations {
		if r.Unavailable[n] == "" {
			on = append(on, n)
		}
	}
	if len(on) == 0 {
		return "nothing"
	}
	return strings.Join(on, ", ")
}

// WriteText writes the human-readable report.
func WriteText(w io.Writer, r *Report) error {
	var b strings.Builder
	fmt.Fprintf(&b, "action      %s\n", r.Action)
	fmt.Fprintf(&b, "variations  %s\n", r.variedList())
	for _, n := range All {
		if why := r.Unavailable[n]; why != "" {
			fmt.Fprintf(&b, "            (%s not varied: %s)\n", n, why)
		}
	}
	b.WriteString("runs\n")
	for _, run := range r.Runs {
		fmt.Fprintf(&b, "  %2d %-9s exit %-3d %6.2fs  %s\n", run.Index, run.Purpose, run.Exit, run.Seconds, describeSetting(run.Setting))
		if len(run.Differs) > 0 {
			fmt.Fprintf(&b, "     %-9s differs: %s\n", "", strings.Join(run.Differs, ", "))
		}
		if run.OutputDir != "" {
			fmt.Fprintf(&b, "     %-9s kept in %s\n", "", joinDir(r.ReportDir, run.OutputDir))
		}
	}
	if !r.Deterministic && !r.BaselineFailed {
		fmt.Fprintf(&b, "\ndifferences: %d (compared: %d outputs, stdout, stderr and the exit code)\n", len(r.Differences), r.Outputs)
		for _, d := range r.Differences {
			writeDifference(&b, r, d)
		}
		if r.Diffoscope != "" && r.Diffoscope != "ran" {
			fmt.Fprintf(&b, "\ndiffoscope: %s\n", r.Diffoscope)
		}
	}
	if r.ReportDir != "" {
		fmt.Fprintf(&b, "\nreport dir  %s\n", r.ReportDir)
	}
	fmt.Fprintf(&b, "\n%s\n", r.Summary())
	_, err := io.WriteString(w, b.String())
	return err
}

func writeDifference(b *strings.Builder, r *Report, d Difference) {
	fmt.Fprintf(b, "\n%s (%s)\n", d.Output, kindText(d))
	fmt.Fprintf(b, "  run 1:  %s\n", describeEntry(d.Baseline))
	fmt.Fprintf(b, "  run %d:  %s\n", d.Run, describeEntry(d.Other))
	if d.FirstDifferentByte >= 0 {
		fmt.Fprintf(b, "  first different byte: %d (0x%x)\n", d.FirstDifferentByte, d.FirstDifferentByte)
	}
	for _, c := range d.Causes {
		fmt.Fprintf(b, "  cause: %s: %s\n", c, CauseText[c])
	}
	if ds := d.Diffoscope; ds != nil {
		if ds.Error != "" {
			fmt.Fprintf(b, "  diffoscope failed: %s\n", ds.Error)
		}
		if ds.HTML != "" {
			fmt.Fprintf(b, "  diffoscope: %s\n", joinDir(r.ReportDir, ds.HTML))
		}
		if ds.Text != "" {
			fmt.Fprintf(b, "  diffoscope: %s\n", joinDir(r.ReportDir, ds.Text))
		}
		for _, l := range strings.Split(strings.TrimRight(ds.excerpt, "\n"), "\n") {
			if l != "" {
				fmt.Fprintf(b, "    | %s\n", l)
			}
		}
	}
}

func kindText(d Difference) string {
	switch {
	case d.Baseline != nil && d.Other != nil && d.Baseline.Kind != d.Other.Kind:
		return d.Baseline.Kind + " vs " + d.Other.Kind
	case d.Kind == KindExitCode:
		return "exit code"
	}
	return d.Kind
}

func describeEntry(e *Entry) string {
	switch {
	case e == nil:
		return "absent"
	case e.Kind == KindExitCode && e.ExitCode != nil:
		return fmt.Sprint(*e.ExitCode)
	case e.Kind == KindSymlink:
		return "-> " + e.Target
	case e.Kind == KindDirectory:
		return "directory"
	}
	s := fmt.Sprintf("%s  %d bytes", e.Digest, e.Size)
	if e.Executable {
		s += "  executable"
	}
	return s
}

func describeSetting(s Setting) string {
	cpus := s.CPUs
	if cpus == "" {
		cpus = "all"
	}
	aslr, env := "on", "as given"
	if !s.ASLR {
		aslr = "off"
	}
	if s.ReverseEnv {
		env = "reversed"
	}
	out := fmt.Sprintf("hostname=%s uid=%d gid=%d execroot=%s cpus=%s aslr=%s env=%s", s.Hostname, s.UID, s.GID, s.ExecRootPath, cpus, aslr, env)
	if s.NewSecond {
		out += " new-second"
	}
	if len(s.Varied) > 0 {
		out += "  [varied: " + strings.Join(s.Varied, ",") + "]"
	}
	return out
}

func joinDir(dir, rel string) string {
	if dir == "" {
		return rel
	}
	return strings.TrimSuffix(dir, "/") + "/" + rel
}
