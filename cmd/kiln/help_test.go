package main

import (
	"strings"
	"testing"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
)

// TestHelpFlagTypes: no flag of any command has its usage's back-quoted words printed
// as its type, as pflag.UnquoteUsage does (`kiln rebuild --help` once showed
// "--key kiln attest pubkey --all --json").
func TestHelpFlagTypes(t *testing.T) {
	var walk func(c *cobra.Command)
	seen := 0
	walk = func(c *cobra.Command) {
		check := func(f *pflag.Flag) {
			seen++
			if name, usage := pflag.UnquoteUsage(f); usage != f.Usage {
				t.Errorf("%s --%s: help shows %q as the flag's type; quote with \"...\" instead of back quotes", c.CommandPath(), f.Name, name)
			}
		}
		c.LocalFlags().VisitAll(check)
		c.PersistentFlags().VisitAll(check)
		for _, sub := range c.Commands() {
			walk(sub)
		}
	}
	walk(newRootCmd())
	if seen < 50 {
		t.Fatalf("walked only %d flags: the command tree was not found", seen)
	}
	// The help text itself, for one command that had the defect.
	root := newRootCmd()
	var out strings.Builder
	root.SetOut(&out)
	root.SetArgs([]string{"rebuild", "--help"})
	if err := root.Execute(); err != nil {
		t.Fatal(err)
	}
	if strings.Contains(out.String(), "--key kiln") {
		t.Fatalf("kiln rebuild --help:\n%s", out.String())
	}
}
