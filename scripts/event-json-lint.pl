#!/usr/bin/env perl
# Only `shared::event` spells OpenHands event JSON. This lint fails if a `json!` literal or an
# index expression in the gateway or the worker names an OpenHands event key; such code must
# build or read the event through `shared::event` (constructors and views) instead.
# Usage: perl scripts/event-json-lint.pl DIR... (prints each finding; exits 1 if any).
use strict;
use warnings;
use File::Find;

my $keys = qr/action|observation|args|extras|tool_call_metadata|llm_metrics|status_update|wait_for_response|cause|source|timestamp|success|error_id/;
my @files;
find(sub { push @files, $File::Find::name if /\.rs$/ }, @ARGV);
my $found = 0;
for my $file (sort @files) {
    open my $fh, '<', $file or die "$file: $!";
    local $/;
    my $text = <$fh>;
    close $fh;
    # Test modules may spell the JSON they assert on.
    $text =~ s/#\[cfg\(test\)\]\s*mod\s+tests\s*\{.*\z//s;
    while ($text =~ /(json!\s*(\((?:[^()]++|(?2))*\)))/g) {
        my ($lit, $at) = ($1, $-[0]);
        if ($lit =~ /"($keys)"\s*:/) {
            my $line = 1 + (substr($text, 0, $at) =~ tr/\n//);
            print "$file:$line: json! literal with OpenHands event key \"$1\"\n";
            $found++;
        }
    }
    while ($text =~ /\[\s*"($keys)"\s*\]/g) {
        my $line = 1 + (substr($text, 0, $-[0]) =~ tr/\n//);
        print "$file:$line: index expression with OpenHands event key \"$1\"\n";
        $found++;
    }
}
exit($found ? 1 : 0);
