package bytesize

import (
	"testing"

	"gopkg.in/yaml.v3"
)

func TestParseAndString(t *testing.T) {
	for _, c := range []struct {
		in   string
		want Size
		out  string
	}{
		{"0", 0, "0"}, {"1048576", 1 << 20, "1MiB"}, {"512MiB", 512 << 20, "512MiB"}, {"50G", 50 << 30, "50GiB"},
		{"2TB", 2 << 40, "2TiB"}, {" 3 kib ", 3 << 10, "3KiB"}, {"1000", 1000, "1000"}, {"1536KiB", 1536 << 10, "1536KiB"},
	} {
		got, err := Parse(c.in)
		if err != nil || got != c.want || got.String() != c.out {
			t.Errorf("Parse(%q) = %d (%s), %v; want %d (%s)", c.in, got, got, err, c.want, c.out)
		}
		if back, err := Parse(got.String()); err != nil || back != got {
			t.Errorf("%s does not read back: %d %v", got, back, err)
		}
	}
	for _, bad := range []string{"", "-1", "1.5GiB", "10XB", "9999999999TiB"} {
		if _, err := Parse(bad); err == nil {
			t.Errorf("Parse(%q) accepted", bad)
		}
	}
}

func TestYAML(t *testing.T) {
	var v struct {
		A, B Size
	}
	if err := yaml.Unmarshal([]byte("a: 50GiB\nb: 1234\n"), &v); err != nil || v.A != 50<<30 || v.B != 1234 {
		t.Fatalf("%+v %v", v, err)
	}
	out, err := yaml.Marshal(v)
	if err != nil || string(out) != "a: 50GiB\nb: 1234\n" {
		t.Fatalf("%q %v", out, err)
	}
	if err := yaml.Unmarshal([]byte("a: lots\n"), &v); err == nil {
		t.Fatal("a bad size was accepted")
	}
}
